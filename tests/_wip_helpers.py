"""Shared test helpers (to be merged into tests/helpers.py)."""
import contextlib

import pytest
import torch

import llmfast
from llmfast.backends import resolve


def require_backend(backend, op, device):
    """Skips (never passes) the test when ``backend`` cannot run ``op`` on ``device`` here."""
    try:
        resolve(op, backend, device)
    except llmfast.BackendUnavailable as exc:
        pytest.skip(str(exc))


def assert_close_2x(out, peer, ref, *, slack_ulps=1.0):
    """flash-attn's rule: ``out``'s max error against the high-precision ``ref`` is at most twice the
    error of ``peer`` (plain PyTorch in ``out``'s dtype), plus ``slack_ulps`` units of ``out``'s dtype at
    the largest reference value (so two correctly rounded results may still differ by one rounding)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out64, peer64, ref64 = out.double(), peer.double(), ref.double()
    assert not torch.isnan(out64).any(), "output has NaNs (unwritten or poisoned elements)"
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    err_peer = (peer64 - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    slack = slack_ulps * torch.finfo(out.dtype).eps * max(scale, 1e-3)
    assert err <= 2 * err_peer + slack, f"max error {err:.3g} > 2 x peer error {err_peer:.3g} + {slack:.3g}"


@contextlib.contextmanager
def poison_allocations():
    """Every float tensor allocated with torch.empty/empty_like inside the block starts as NaN, so an
    output element a kernel forgets to write shows up (C++ allocations are not covered)."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
