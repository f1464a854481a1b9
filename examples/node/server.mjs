// A zeroship bundle behind HTTP in Node.js, with the same routes and body as `zeroship serve`:
//
//   node server.mjs BUNDLE [--engine auto|pipeline|ort] [--dtype fp32|q8|fp16] [--host 127.0.0.1] [--port 8080]
//
//   POST /predict  {"texts": [...]} → {"model": {...}, "predictions": [...]}
//   GET  /healthz  GET /metadata
//
// Bad requests get a 400 that says what is wrong; one text is never answered with another's result.
import http from 'node:http';
import { parseArgs } from 'node:util';

import { loadBundle } from './bundle.mjs';

const MAX_BODY = 1 << 20;
const MAX_TEXTS = 64;
const MAX_CHARS = 10000;

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    engine: { type: 'string', default: 'auto' },
    dtype: { type: 'string', default: 'fp32' },
    host: { type: 'string', default: '127.0.0.1' }, // loopback unless asked otherwise
    port: { type: 'string', default: '8080' },
  },
});
if (positionals.length !== 1) {
  console.error('usage: node server.mjs BUNDLE [--engine auto|pipeline|ort] [--dtype fp32|q8|fp16] [--host H] [--port P]');
  process.exit(2);
}

let model;
try {
  model = await loadBundle(positionals[0], { engine: values.engine, dtype: values.dtype });
} catch (err) {
  console.error(`error: ${err.message}`);
  process.exit(2);
}
const info = { run: model.manifest.run, task: model.manifest.task, engine: model.engine, dtype: model.dtype };

function reply(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

// The texts of a /predict body, or an Error whose message says what is wrong with it.
function parseTexts(raw) {
  let body;
  try {
    body = JSON.parse(raw);
  } catch (err) {
    throw new Error(`the body is not JSON: ${err.message.slice(0, 120)}`);
  }
  const texts = body?.texts;
  if (!Array.isArray(texts)) throw new Error('expected {"texts": ["...", ...]}');
  if (texts.length > MAX_TEXTS) throw new Error(`${texts.length} texts; at most ${MAX_TEXTS} per request`);
  texts.forEach((t, i) => {
    if (typeof t !== 'string') throw new Error(`texts[${i}] is ${t === null ? 'null' : typeof t}, not a string`);
    if (t.length > MAX_CHARS) throw new Error(`texts[${i}] has ${t.length} characters; at most ${MAX_CHARS}`);
    if (/\p{Cs}/u.test(t)) throw new Error(`texts[${i}] holds a lone surrogate`);
  });
  return texts;
}

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/healthz') return reply(res, 200, { status: 'ok' });
  if (req.method === 'GET' && req.url === '/metadata') {
    const { labels, max_length: maxLength, casing } = model.manifest;
    return reply(res, 200, { ...info, labels, max_length: maxLength, casing });
  }
  if (req.method !== 'POST' || req.url !== '/predict') return reply(res, 404, { error: 'not found' });
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) {
      reply(res, 413, { error: `body over ${MAX_BODY} bytes` });
      req.destroy();
    } else chunks.push(c);
  });
  req.on('end', async () => {
    if (res.writableEnded) return;
    let texts;
    try {
      texts = parseTexts(Buffer.concat(chunks).toString('utf8'));
    } catch (err) {
      return reply(res, 400, { error: 'bad request', detail: err.message });
    }
    try {
      reply(res, 200, { model: info, predictions: await model.predict(texts) });
    } catch (err) {
      console.error(err);
      reply(res, 500, { error: 'prediction failed', detail: String(err.message).slice(0, 200) });
    }
  });
});

server.listen(Number(values.port), values.host, () => {
  const { address, port } = server.address();
  // one line a supervisor (or a test) can wait for; --port 0 takes a free port
  console.log(`listening on http://${address.includes(':') ? `[${address}]` : address}:${port} `
    + `(${model.engine}, ${model.dtype}, ${info.task})`);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
