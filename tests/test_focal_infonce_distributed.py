"""gather=True across 2 CPU processes (gloo) equals the single-process loss on the global batch."""
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SIZES = (3, 2)  # queries per rank: unequal on purpose
CONFIGS = [  # (backend, options)
    ("torch", dict(temperature=0.05, gamma=0.5)),
    ("torch", dict(temperature=0.05, gamma=2.0, false_negative_margin=0.1, similarity="dot")),
    ("reference", dict(temperature=0.05, gamma=0.0, detach_focal_weight=True)),
]


def _global_inputs(m=2, d=8):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(SIZES), d, generator=gen, dtype=torch.float64).float()
    docs = (0.4 * q[:, None] + torch.randn(sum(SIZES), 1 + m, d, generator=gen)) / 2
    return q, docs


def _run(q, docs, backend, options, reduction, gather):
    from kalm_fast.ops import focal_infonce

    q = q.clone().requires_grad_()
    docs = docs.clone().requires_grad_()
    loss = focal_infonce(q, docs, gather=gather, reduction=reduction, backend=backend, **options)
    loss.sum().backward()
    return loss.detach(), q.grad, docs.grad


def _worker(rank: int, port: int, out: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(SIZES),
                            timeout=timedelta(seconds=60))
    q, docs = _global_inputs()
    lo = sum(SIZES[:rank])
    rows = slice(lo, lo + SIZES[rank])
    results = [[_run(q[rows], docs[rows], backend, options, reduction, True) for reduction in ("none", "sum")]
               for backend, options in CONFIGS]
    torch.save(results, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name resolves to
    for attempt in range(3):  # a port taken between _free_port and the bind is retried
        port = _free_port()
        outs = [str(tmp_path / f"rank{r}-{attempt}.pt") for r in range(len(SIZES))]
        procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), outs[r]], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(len(SIZES))]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=180)[0])
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                pytest.fail("distributed workers timed out after 180 s")
        if all(p.returncode == 0 for p in procs):
            return [torch.load(o) for o in outs]
        if not any("address already in use" in log.lower() for log in logs):
            break
    pytest.fail("distributed workers failed:\n" + "\n".join(logs))


def test_gather_equals_global_batch(tmp_path):
    per_rank = _spawn(tmp_path)
    q, docs = _global_inputs()
    bounds = [sum(SIZES[:r]) for r in range(len(SIZES) + 1)]
    for c, (backend, options) in enumerate(CONFIGS):
        for k, reduction in enumerate(("none", "sum")):
            loss, dq, ddocs = _run(q, docs, backend, options, reduction, False)
            got = [per_rank[r][c][k] for r in range(len(SIZES))]
            if reduction == "none":
                torch.testing.assert_close(torch.cat([g[0] for g in got]), loss, atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(sum(g[0] for g in got), loss, atol=1e-5, rtol=1e-5)
            for r, (_, rq, rdocs) in enumerate(got):
                rows = slice(bounds[r], bounds[r + 1])
                torch.testing.assert_close(rq, dq[rows], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(rdocs, ddocs[rows], atol=1e-5, rtol=1e-4)


def test_gather_without_process_group_raises():
    from kalm_fast.ops import focal_infonce

    with pytest.raises(RuntimeError, match="init_process_group"):
        focal_infonce(torch.randn(2, 4), torch.randn(2, 2, 4), gather=True)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
