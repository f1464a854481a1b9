"""The server a user would write by hand around the bundle (benchmarks/serve_http.py's baseline):
FastAPI + uvicorn, one process, no batching. Usage: handwritten_server.py BUNDLE PORT THREADS [cpu|cuda]"""
import sys

import uvicorn
from fastapi import FastAPI

from export.runtime import Predictor

predictor = Predictor.load(sys.argv[1], threads=int(sys.argv[3]), device=(sys.argv[4:] or ["cpu"])[0])
app = FastAPI()


@app.post("/predict")
def predict(body: dict) -> dict:
    return {"predictions": predictor.predict(body["texts"])}


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
