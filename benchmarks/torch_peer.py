"""The PyTorch side of `mtp_jax.benchmarks.parity`, run under an interpreter that has torch (never
this project's environment: torch is not a dependency). It loads the peer model file, builds its
n = 1 and n = 4 models and the bare matmul, then answers one command per stdin line with one JSON
line, so the parent can alternate engines round by round while only one of them runs at a time:

    step N K     -> {"seconds": s}   K training steps of the n = N model (the peer's own loop body)
    matmul K     -> {"seconds": s}   K float32 (B*T, d) x (d, d_ff) matmuls
"""

import argparse
import importlib.util
import json
import sys
import time

import torch


def load_peer(path: str):
    spec = importlib.util.spec_from_file_location("torch_mtp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PeerModel:
    """One peer model with its AdamW and a fixed batch; `step` is the body of the peer's main loop."""

    def __init__(self, peer, a: argparse.Namespace, n: int):
        torch.manual_seed(0)
        self.model = peer.MTP(a.vocab, a.d, a.layers, a.heads, n)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        self.tokens = torch.randint(0, a.vocab, (a.batch, a.seq + n))
        self.seq = a.seq

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.step(self.tokens, self.seq)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", required=True)
    for k in ("d", "layers", "heads", "vocab", "batch", "seq", "d-ff"):
        p.add_argument(f"--{k}", type=int, required=True)
    p.add_argument("--ns", default="1,4")
    a = p.parse_args()
    peer = load_peer(a.peer)
    models = {int(n): PeerModel(peer, a, int(n)) for n in a.ns.split(",")}
    x, w = torch.ones(a.batch * a.seq, a.d), torch.ones(a.d, a.d_ff)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        start = time.perf_counter()
        if cmd[0] == "step":
            model = models[int(cmd[1])]
            loss = [model.step() for _ in range(int(cmd[2]))][-1]
        else:
            for _ in range(int(cmd[1])):
                x @ w
            loss = None
        print(json.dumps({"seconds": time.perf_counter() - start, "loss": loss}), flush=True)


if __name__ == "__main__":
    main()
