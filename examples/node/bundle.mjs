// A zeroship bundle in Node.js: two engines over the same folder, each answering like Python's
// export.runtime.Predictor.
//
//   pipeline  Transformers.js's own pipeline ("token-classification" with aggregation "simple", or
//             "text-classification"): what a Hugging Face user writes. Entities come back as the
//             tokenizer decodes them (lowercased by an uncased tokenizer), without character offsets.
//   ort       onnxruntime-node directly, with Transformers.js's tokenizer: character offsets and the
//             original text of each entity, long texts in overlapping windows, and the casing classes a
//             `model.casing` bundle needs as token types (Transformers.js's tokenizer cannot give them).
//
// `auto` picks `pipeline`, or `ort` for a casing bundle.
import { readFileSync } from 'node:fs';
import path from 'node:path';

const TOKEN = 'token_classification';
const FILES = { fp32: 'onnx/model.onnx', q8: 'onnx/model_quantized.onnx', fp16: 'onnx/model_fp16.onnx' };

export async function loadBundle(dir, { engine = 'auto', dtype = 'fp32' } = {}) {
  const folder = path.resolve(dir);
  const manifest = JSON.parse(readFileSync(path.join(folder, 'manifest.json'), 'utf8'));
  if (manifest.format_version !== 2) {
    throw new Error(`${folder}: bundle format ${manifest.format_version}; re-export it with zeroship export onnx`);
  }
  if (!FILES[dtype]) throw new Error(`dtype ${dtype}: one of ${Object.keys(FILES).join(', ')}`);
  const casing = Boolean(manifest.casing);
  const chosen = engine === 'auto' ? (casing ? 'ort' : 'pipeline') : engine;
  if (chosen === 'pipeline' && casing) {
    throw new Error('this bundle feeds casing classes as token types (model.casing); Transformers.js\'s '
      + 'pipeline cannot compute them: use --engine ort');
  }
  const make = { pipeline: pipelineEngine, ort: ortEngine }[chosen];
  if (!make) throw new Error(`engine ${engine}: one of auto, pipeline, ort`);
  const predict = await make(folder, manifest, dtype);
  return { manifest, engine: chosen, dtype, predict };
}

// ------------------------------------------------------------------ Transformers.js pipeline
async function pipelineEngine(folder, manifest, dtype) {
  const { pipeline, env } = await import('@huggingface/transformers');
  env.allowRemoteModels = false; // the bundle is all there is: never reach for the Hub
  env.localModelPath = path.dirname(folder) + path.sep;
  const task = manifest.task === TOKEN ? 'token-classification' : 'text-classification';
  const pipe = await pipeline(task, path.basename(folder), { dtype });
  if (manifest.task === TOKEN) {
    return async (texts) => {
      const out = [];
      for (const text of texts) {
        const groups = await pipe(text, { aggregation_strategy: 'simple' });
        out.push(groups.map((g) => ({ label: g.entity_group, text: g.word, score: g.score })));
      }
      return out;
    };
  }
  return async (texts) => {
    const out = [];
    for (const text of texts) {
      const [best] = await pipe(text);
      out.push({ label: best.label, score: best.score });
    }
    return out;
  };
}

// ------------------------------------------------------------------ onnxruntime-node
async function ortEngine(folder, manifest, dtype) {
  const ort = await import('onnxruntime-node');
  const { AutoTokenizer, env } = await import('@huggingface/transformers');
  env.allowRemoteModels = false;
  env.localModelPath = path.dirname(folder) + path.sep;
  const tokenizer = await AutoTokenizer.from_pretrained(path.basename(folder));
  const session = await ort.InferenceSession.create(path.join(folder, FILES[dtype]));
  const prefix = JSON.parse(readFileSync(path.join(folder, 'tokenizer.json'), 'utf8')).model
    ?.continuing_subword_prefix ?? '##';
  const specials = tokenizer.encode('');
  const model = {
    ort, session, manifest, prefix, cls: specials[0], sep: specials[specials.length - 1],
    unk: tokenizer.unk_token ?? '[UNK]', types: session.inputNames.includes('token_type_ids'),
  };
  return async (texts) => {
    const out = [];
    for (const text of texts) {
      const pieces = tokenizer.tokenize(text);
      const ids = tokenizer.encode(text, { add_special_tokens: false });
      const spans = alignPieces(text, pieces, model);
      const windows = manifest.task === TOKEN
        ? windowsOf(ids.length, manifest.max_length - 2, manifest.stride)
        : [[0, Math.min(ids.length, manifest.max_length - 2)]];
      const logits = await run(model, text, ids, spans, windows);
      out.push(manifest.task === TOKEN
        ? entities(text, pieces, spans, windows, logits, model)
        : classify(logits[0][0], manifest.labels));
    }
    return out;
  };
}

// The [start, end) of each window's content tokens: `size` tokens, the next one `stride` tokens back
// from where this one ends (the Hugging Face tokenizers' overflow, as the Python runtime uses it).
function windowsOf(n, size, stride) {
  const windows = [[0, Math.min(n, size)]];
  while (windows[windows.length - 1][1] < n) {
    const start = windows[windows.length - 1][1] - stride;
    windows.push([start, Math.min(n, start + size)]);
  }
  return windows;
}

// Where each WordPiece piece was cut from, in code points of `text` (as Python indexes strings):
// pieces and text are compared case- and accent-folded, as an uncased tokenizer normalizes them.
function alignPieces(text, pieces, { prefix, unk }) {
  const chars = [];
  const from = [];
  Array.from(text).forEach((c, i) => {
    for (const d of fold(c)) { chars.push(d); from.push(i); }
  });
  const at = (j, want) => want.every((c, n) => chars[j + n] === c);
  let k = 0;
  return pieces.map((piece) => {
    while (k < chars.length && /\s/u.test(chars[k])) k += 1;
    let start = k;
    if (piece === unk) { // an unknown word: the rest of it, up to a space or punctuation
      while (k < chars.length && !/[\s\p{P}]/u.test(chars[k])) k += 1;
      k = Math.max(k, start + 1);
    } else {
      const want = Array.from(fold(piece.startsWith(prefix) ? piece.slice(prefix.length) : piece));
      while (start < chars.length && !at(start, want)) start += 1; // past what the tokenizer dropped
      k = start + want.length;
    }
    const last = Math.min(k, chars.length) - 1;
    return [from[Math.min(start, last)], from[last] + 1];
  });
}

function fold(s) {
  return s.normalize('NFD').replace(/\p{Mn}/gu, '').toLowerCase();
}

// zeroship.casing.casing_class, for a `model.casing` bundle's token types.
const NONE = 0; const LOWER = 1; const TITLE = 2; const UPPER = 3; const MIXED = 4;
function casingClass(piece) {
  const cased = Array.from(piece).filter((c) => c.toLowerCase() !== c.toUpperCase());
  if (!cased.length) return NONE;
  const lower = (c) => c !== c.toUpperCase();
  const upper = (c) => c !== c.toLowerCase();
  if (cased.every(lower)) return LOWER;
  if (cased.length > 1 && cased.every(upper)) return UPPER;
  return upper(cased[0]) ? TITLE : MIXED;
}

async function run({ ort, session, manifest, cls, sep, types }, text, ids, spans, windows) {
  const chars = Array.from(text);
  const width = Math.max(...windows.map(([s, e]) => e - s)) + 2;
  const feed = { input_ids: [], attention_mask: [], token_type_ids: [] };
  for (const [s, e] of windows) {
    const pad = width - (e - s + 2);
    feed.input_ids.push(cls, ...ids.slice(s, e), sep, ...Array(pad).fill(manifest.pad_token_id));
    feed.attention_mask.push(...Array(e - s + 2).fill(1), ...Array(pad).fill(0));
    const kinds = spans.slice(s, e).map(([a, b]) => (manifest.casing ? casingClass(chars.slice(a, b).join('')) : 0));
    feed.token_type_ids.push(0, ...kinds, 0, ...Array(pad).fill(0));
  }
  const tensor = (v) => new ort.Tensor('int64', BigInt64Array.from(v, BigInt), [windows.length, width]);
  const inputs = { input_ids: tensor(feed.input_ids), attention_mask: tensor(feed.attention_mask) };
  if (types) inputs.token_type_ids = tensor(feed.token_type_ids);
  const { logits } = await session.run(inputs);
  const labels = logits.dims[logits.dims.length - 1];
  const rows = [];
  for (let w = 0; w < windows.length; w += 1) { // [window][position][label]
    const per = manifest.task === TOKEN ? width : 1;
    rows.push(Array.from({ length: per }, (_, p) => logits.data.slice((w * per + p) * labels, (w * per + p + 1) * labels)));
  }
  return rows;
}

function softmax(row) {
  const top = Math.max(...row);
  const e = Array.from(row, (x) => Math.exp(x - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum);
}

function classify(row, labels) {
  const probs = softmax(row);
  const best = probs.indexOf(Math.max(...probs));
  return { label: labels[best], score: probs[best] };
}

// Predictor's "first" strategy: each word takes the label of its first piece (from the window where that
// piece sits most centrally); B-/I- runs of one type become a span, its score the mean of its words'.
function entities(text, pieces, spans, windows, logits, { manifest, prefix }) {
  const word = [];
  pieces.forEach((p, i) => word.push(i === 0 || !p.startsWith(prefix) ? (word[i - 1] ?? -1) + 1 : word[i - 1]));
  const best = new Map();
  windows.forEach(([s, e], w) => {
    for (let i = s; i < e; i += 1) {
      if (i > 0 && pieces[i].startsWith(prefix)) continue; // not its word's first piece
      const pos = i - s + 1;
      const centrality = Math.min(pos, e - s + 1 - pos);
      if (!best.has(i) || centrality > best.get(i)[0]) best.set(i, [centrality, softmax(logits[w][pos])]);
    }
  });
  const wordEnd = new Map();
  pieces.forEach((_, i) => wordEnd.set(word[i], spans[i][1]));
  const chars = Array.from(text);
  const found = [];
  let current = null;
  for (const i of [...best.keys()].sort((a, b) => a - b)) {
    const probs = best.get(i)[1];
    const k = probs.indexOf(Math.max(...probs));
    const tag = manifest.labels[k];
    const kind = tag === 'O' ? null : tag.slice(2);
    if (current && tag.startsWith('I-') && kind === current.label) {
      current.end = wordEnd.get(word[i]);
      current.scores.push(probs[k]);
      continue;
    }
    if (current) found.push(current);
    current = kind ? { label: kind, start: spans[i][0], end: wordEnd.get(word[i]), scores: [probs[k]] } : null;
  }
  if (current) found.push(current);
  return found.map(({ label, start, end, scores }) => ({
    label, start, end, text: chars.slice(start, end).join(''), score: scores.reduce((a, b) => a + b, 0) / scores.length,
  }));
}
