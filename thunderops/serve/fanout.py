"""One sequence per engine request: the router's split of ``n > 1`` and batched prompts, and the merge back.

vLLM's disaggregated flow hands one prompt's KV blocks from a prefill engine to a decode engine through the
``kv_transfer_params`` of one response, so a request that asks for several sequences (``n`` samples, or the
completions API's list of prompts) cannot go through it as one request. The router sends each sequence as its
own request (``n=1``, one prompt) and merges the answers into the one the client asked for, numbered as vLLM
numbers them (``index = prompt * n + sample``). Usage counts each prompt once, as vLLM does. A fixed ``seed``
becomes ``seed + sample`` so that the samples of one prompt differ, as they do under one seeded request.
Colocated engines get the same split: one mechanism, and prefix caching makes the repeated prompts cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_SEQUENCES = 256  # per request (n x prompts): each is an engine request of its own


class SplitError(ValueError):
    """A request whose `n` or `prompt` cannot be split (the client gets a 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Sequence:
    """One sequence of a split request: the body to send and where its answer goes."""

    body: dict[str, Any]
    index: int  # the choice index in the merged answer
    prompt: int  # which of the request's prompts it continues


def split(body: dict[str, Any], chat: bool) -> list[Sequence] | None:
    """The single-sequence requests `body` stands for, or None when it already is one."""
    n = body.get("n")
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SplitError(f"n must be a positive integer, got {n!r}", "n")
    prompts: list[Any] | None = None
    p = body.get("prompt")
    if not chat and isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        prompts = p  # a batch of prompts (texts or token-id lists)
    if n == 1 and (prompts is None or len(prompts) == 1):
        return None
    count = n * (len(prompts) if prompts is not None else 1)
    if count > MAX_SEQUENCES:
        raise SplitError(f"at most {MAX_SEQUENCES} sequences per request (n x prompts), got {count}; split the "
                         "request", "n")
    seed = body.get("seed")
    out = []
    for i, prompt in enumerate(prompts if prompts is not None else [None]):
        for j in range(n):
            sub = dict(body)
            sub.pop("n", None)
            if prompts is not None:
                sub["prompt"] = prompt
            if n > 1 and isinstance(seed, int) and not isinstance(seed, bool):
                sub["seed"] = seed + j
            out.append(Sequence(sub, i * n + j, i))
    return out


def merge_answers(answers: list[dict[str, Any]], seqs: list[Sequence]) -> dict[str, Any]:
    """One non-streamed answer from the sequences' answers (each with one choice), in choice order."""
    merged = {k: v for k, v in answers[0].items() if k != "kv_transfer_params"}
    choices = []
    for ans, seq in zip(answers, seqs, strict=True):
        for c in ans.get("choices") or []:
            choices.append({**c, "index": seq.index})
    merged["choices"] = sorted(choices, key=lambda c: c["index"])
    usage = Usage()
    for ans, seq in zip(answers, seqs, strict=True):
        usage.add(seq, ans.get("usage") or {})
    merged["usage"] = usage.as_dict()
    return merged


@dataclass
class Usage:
    """Token counts of a split request: each prompt once, every sequence's output."""

    prompt: dict[int, int] = field(default_factory=dict)  # prompt number -> its tokens
    completion: dict[int, int] = field(default_factory=dict)  # choice index -> tokens so far

    def add(self, seq: Sequence, usage: dict[str, Any]) -> None:
        self.prompt[seq.prompt] = int(usage.get("prompt_tokens") or 0)
        self.completion[seq.index] = int(usage.get("completion_tokens") or 0)

    def as_dict(self) -> dict[str, int]:
        p, c = sum(self.prompt.values()), sum(self.completion.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class ChunkSink(Protocol):
    """Where a stream's chunks go (the router's client stream)."""

    @property
    def opened(self) -> bool: ...

    async def open(self) -> None: ...

    async def emit(self, chunk: dict[str, Any]) -> None: ...


class MergedStream:
    """The client's one stream fed by the streams of a split request's sequences. Each chunk gets its
    sequence's choice index and the first stream's id; usage is the running total over all sequences, and the
    final usage-only chunk is sent once, by `finish`, after every sequence has ended."""

    def __init__(self, client: ChunkSink, want_usage: bool) -> None:
        self.client = client
        self.want_usage = want_usage
        self.usage = Usage()
        self.head: dict[str, Any] | None = None  # id, object, created, model of the first chunk

    def part(self, seq: Sequence) -> Part:
        return Part(self, seq)

    async def emit(self, seq: Sequence, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            await self.client.emit(chunk)
            return
        if self.head is None:
            self.head = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
        else:
            chunk["id"], chunk["created"] = self.head["id"], self.head["created"]
        usage = chunk.get("usage")
        if usage:
            self.usage.add(seq, usage)
        choices = chunk.get("choices") or []
        if not choices:
            return  # a sequence's own final usage chunk: `finish` sends the total
        for c in choices:
            c["index"] = seq.index
        if usage:
            chunk["usage"] = self.usage.as_dict()
        await self.client.emit(chunk)

    async def finish(self) -> None:
        if self.want_usage and self.head is not None:
            await self.client.emit({**self.head, "choices": [], "usage": self.usage.as_dict()})


class Part:
    """One sequence's view of a `MergedStream`, given to the router's stream loop in place of the client."""

    def __init__(self, merged: MergedStream, seq: Sequence) -> None:
        self.merged = merged
        self.seq = seq
        self.opened = False

    async def open(self) -> None:
        self.opened = True
        await self.merged.client.open()

    async def emit(self, chunk: dict[str, Any]) -> None:
        await self.merged.emit(self.seq, chunk)
