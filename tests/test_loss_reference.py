"""The pure-PyTorch ConKD loss against hand computations and textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conkd_scale.config import build_config
from conkd_scale.loss import (
    IGNORE_INDEX,
    GateConfig,
    LossConfig,
    conkd_loss_reference,
    gate,
    item_mass,
)
from conkd_scale.utils.errors import ConfigError
from tests.loss_helpers import one_thread  # noqa: F401 (autouse fixture)

MODES = ("hard", "soft", "static", "oracle", "dialog", "rec")


def _lse(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _py_conkd(z, t, q, rec_row, items, labels, cfg: LossConfig) -> dict[str, float]:
    """The METHOD.md formula in plain Python (finite inputs, q > 0)."""
    tau, g = cfg.tau, cfg.gate
    tot = {"ce": 0.0, "kd_dialog": 0.0, "kd_rec": 0.0}
    lams, ms, M = [], [], 0
    for n, y in enumerate(labels):
        if y == IGNORE_INDEX:
            lams.append(0.0)
            ms.append(0.0)
            continue
        M += 1
        zn, tn = z[n], t[n]
        m = math.exp(_lse([tn[i] for i in items]) - _lse(tn))
        lam = {
            "hard": float(m > g.eta),
            "soft": m,
            "static": g.c,
            "oracle": float(y in items),
            "dialog": 0.0,
            "rec": 1.0,
        }[g.mode]
        lams.append(lam)
        ms.append(m)
        tot["ce"] += _lse(zn) - zn[y]
        ls = [x / tau - _lse([v / tau for v in zn]) for x in zn]
        ld = [x / tau - _lse([v / tau for v in tn]) for x in tn]
        kl_d = sum(math.exp(a) * (a - b) for a, b in zip(ld, ls, strict=True))
        lq_raw = [math.log(p) / tau for p in q[rec_row[n]]]
        lq = [a - _lse(lq_raw) for a in lq_raw]
        kl_r = sum(math.exp(a) * (a - ls[i]) for a, i in zip(lq, items, strict=True))
        tot["kd_dialog"] += tau**2 * (1 - lam) * kl_d
        tot["kd_rec"] += tau**2 * lam * kl_r
    out = {k: v / max(M, 1) for k, v in tot.items()}
    out["kd"] = out["kd_dialog"] + out["kd_rec"]
    out["loss"] = cfg.w_ce * out["ce"] + cfg.w_kd * out["kd"]
    out["lam"], out["m"] = lams, ms
    return out


def _random_case(N=9, V=6, items=(4, 1, 5), S=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=dtype) * 2
    t = torch.randn(N, V, generator=g, dtype=dtype) * 2
    item_ids = torch.tensor(items)
    t[::2, item_ids] += 3.0  # some rows with high item mass
    q = torch.softmax(torch.randn(S, len(items), generator=g, dtype=dtype), -1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[1] = IGNORE_INDEX
    labels[2] = items[0]
    rec_row = torch.randint(0, S, (N,), generator=g)
    rec_row[labels == IGNORE_INDEX] = -1
    return z, t, q, rec_row, item_ids, labels


def test_closed_form_case() -> None:
    """V=4, uniform student and teacher, items {3, 1}, q = (1, 0): every term by hand."""
    z = torch.zeros(1, 4, requires_grad=True)
    t = torch.zeros(1, 4)
    q = torch.tensor([[1.0, 0.0]])  # all of R's mass on item token 3; zero prob → xlogy 0
    items, labels, rec_row = torch.tensor([3, 1]), torch.tensor([2]), torch.tensor([0])
    # m = 2/4 = 0.5; ce = log 4; KL(p_D‖p_S) = 0; KL(q‖p_S) = 1·log(1 / (1/4)) = log 4
    for mode, lam in (("hard", 0.0), ("soft", 0.5), ("rec", 1.0)):
        cfg = LossConfig(gate=GateConfig(mode=mode, eta=0.5))
        out = conkd_loss_reference(z, t, q, rec_row, items, labels, cfg)
        assert out.m_N.item() == pytest.approx(0.5)
        assert out.lam_N.item() == pytest.approx(lam)  # hard: 0.5 is not > η = 0.5
        assert out.ce.item() == pytest.approx(math.log(4))
        assert out.kd_dialog.item() == pytest.approx(0.0, abs=1e-7)
        assert out.kd_rec.item() == pytest.approx(lam * math.log(4))
        assert out.loss.item() == pytest.approx(0.5 * math.log(4) + 0.5 * lam * math.log(4))
        assert out.n_tokens == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_matches_plain_python(mode: str, tau: float) -> None:
    z, t, q, rec_row, items, labels = _random_case()
    cfg = LossConfig(gate=GateConfig(mode=mode, eta=0.3, c=0.25), tau=tau, w_ce=0.7, w_kd=1.3)
    exp = _py_conkd(z.tolist(), t.tolist(), q.tolist(), rec_row.tolist(), items.tolist(),
                    labels.tolist(), cfg)  # fmt: skip
    out = conkd_loss_reference(z, t, q, rec_row, items, labels, cfg)
    for key in ("loss", "ce", "kd", "kd_dialog", "kd_rec"):
        assert getattr(out, key).item() == pytest.approx(exp[key], rel=1e-9, abs=1e-12), key
    assert out.lam_N.tolist() == pytest.approx(exp["lam"], rel=1e-6)
    assert out.m_N.tolist() == pytest.approx(exp["m"], rel=1e-6)
    assert out.n_tokens == 8


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_single_teacher_reductions(tau: float) -> None:
    """λ≡0 is plain KD from D, λ≡1 plain KD from R placed into U (zero on words)."""
    z, t, q, rec_row, items, labels = _random_case(N=7, V=9, items=(7, 2, 5))
    valid = labels != IGNORE_INDEX
    logp_s = F.log_softmax(z[valid] / tau, -1)
    kd_d = F.kl_div(logp_s, F.log_softmax(t[valid] / tau, -1), log_target=True,
                    reduction="batchmean") * tau**2  # fmt: skip
    q_tau = q ** (1 / tau)
    q_tau = q_tau / q_tau.sum(-1, keepdim=True)
    q_U = torch.zeros_like(z)
    q_U[:, items] = q_tau[rec_row.clamp(min=0)]
    kd_r = F.kl_div(logp_s, q_U[valid], reduction="batchmean") * tau**2
    cfg = LossConfig(tau=tau, w_ce=0.0, w_kd=1.0)
    cfg.gate.mode = "dialog"
    out = conkd_loss_reference(z, t, q, rec_row, items, labels, cfg)
    assert out.loss.item() == pytest.approx(kd_d.item(), rel=1e-10)
    assert out.kd_rec.item() == 0.0
    cfg.gate.mode = "rec"
    out = conkd_loss_reference(z, t, q, rec_row, items, labels, cfg)
    assert out.loss.item() == pytest.approx(kd_r.item(), rel=1e-10)
    assert out.kd_dialog.item() == 0.0
    # static gate c interpolates linearly between the two
    cfg.gate = GateConfig(mode="static", c=0.3)
    out = conkd_loss_reference(z, t, q, rec_row, items, labels, cfg)
    assert out.loss.item() == pytest.approx(0.7 * kd_d.item() + 0.3 * kd_r.item(), rel=1e-10)


def test_wkd_zero_is_masked_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 5, 11, generator=g, requires_grad=True)  # [B, T, V]
    t = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    rec_row = torch.where(labels == IGNORE_INDEX, -1, 0)
    q = torch.tensor([[0.5, 0.5]])
    out = conkd_loss_reference(z, t, q, rec_row, torch.tensor([3, 8]), labels,
                               LossConfig(w_ce=1.0, w_kd=0.0))  # fmt: skip
    exp = F.cross_entropy(z.reshape(-1, 11), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, exp)
    (g1,) = torch.autograd.grad(out.loss, z)
    (g2,) = torch.autograd.grad(exp, z)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode: str) -> None:
    z, t, q, rec_row, items, labels = _random_case(N=5, V=6, seed=2)
    z.requires_grad_(True)
    cfg = LossConfig(gate=GateConfig(mode=mode, eta=0.4), tau=1.7, w_ce=0.6, w_kd=0.9)

    def f(z_: torch.Tensor) -> torch.Tensor:
        return conkd_loss_reference(z_, t, q, rec_row, items, labels, cfg).loss

    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_ignored_rows_contribute_nothing() -> None:
    z, t, q, rec_row, items, labels = _random_case(N=8, V=6)
    labels[5] = IGNORE_INDEX
    rec_row[5] = -1
    cfg = LossConfig(gate=GateConfig(mode="soft"))
    z1 = z.clone().requires_grad_(True)
    out1 = conkd_loss_reference(z1, t, q, rec_row, items, labels, cfg)
    out1.loss.backward()
    z2 = z.clone()
    t2 = t.clone()
    for row in (1, 5):
        z2[row] = torch.tensor([1e30, float("nan"), -float("inf"), 0.0, 5.0, float("inf")])
        t2[row] = float("nan")
    z2.requires_grad_(True)
    out2 = conkd_loss_reference(z2, t2, q, rec_row, items, labels, cfg)
    out2.loss.backward()
    assert out2.loss.item() == out1.loss.item()
    assert torch.equal(z1.grad, z2.grad)
    assert torch.all(z2.grad[[1, 5]] == 0)
    assert out2.lam_N[[1, 5]].tolist() == [0.0, 0.0] and out2.n_tokens == 6


def test_all_rows_ignored_gives_zero() -> None:
    z = torch.randn(3, 5, requires_grad=True)
    labels = torch.full((3,), IGNORE_INDEX)
    out = conkd_loss_reference(z, torch.randn(3, 5), torch.ones(0, 2), torch.full((3,), -1),
                               torch.tensor([0, 1]), labels, LossConfig())  # fmt: skip
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.ce.item() == 0.0 and out.n_tokens == 0
    assert torch.all(z.grad == 0)


def test_stable_for_huge_and_infinite_logits() -> None:
    z, t, q, rec_row, items, labels = _random_case(N=6, V=6, dtype=torch.float32)
    z = z * 1e4
    t = t * 1e4
    z[0, 0] = t[0, 0] = -float("inf")  # both -inf: contributes 0
    t[2, 3] = -float("inf")  # teacher -inf only: p_D = 0 there
    t[3] = -float("inf")
    t[3, 2] = 0.0  # teacher one-hot
    q[0, 1] = 0.0  # a zero recommendation probability
    labels[0] = 1
    z.requires_grad_(True)
    for mode in MODES:
        out = conkd_loss_reference(z, t, q, rec_row, items, labels,
                                   LossConfig(gate=GateConfig(mode=mode)))  # fmt: skip
        (grad,) = torch.autograd.grad(out.loss, z)
        assert torch.isfinite(out.loss), mode
        assert torch.isfinite(grad).all(), mode
        assert math.isfinite(out.kd_rec.item()) and math.isfinite(out.kd_dialog.item())


def test_infinite_kl_with_zero_weight_is_ignored() -> None:
    """Student -inf on an item R favours: KL(q‖p_S) = inf, harmless where λ = 0."""
    z = torch.tensor([[0.0, 1.0, -float("inf"), 0.5]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, -float("inf"), 0.5]])
    args = (torch.tensor([[1.0]]), torch.tensor([0]), torch.tensor([2]), torch.tensor([1]))
    out = conkd_loss_reference(z, t, *args, LossConfig(gate=GateConfig(mode="dialog")))
    (grad,) = torch.autograd.grad(out.loss, z)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    out = conkd_loss_reference(z, t, *args, LossConfig(gate=GateConfig(mode="rec")))
    assert out.loss.item() == math.inf


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    z, t, q, rec_row, items, labels = _random_case(N=8, V=40, items=(3, 17, 9, 30),
                                                   dtype=torch.float32)  # fmt: skip
    cfg = LossConfig(gate=GateConfig(mode="soft"), tau=2.0)
    z_lp = z.to(dtype).requires_grad_(True)
    out = conkd_loss_reference(z_lp, t.to(dtype), q.to(dtype), rec_row, items, labels, cfg)
    out.loss.backward()
    exp = conkd_loss_reference(z_lp.detach().float(), t.to(dtype).float(), q.to(dtype).float(),
                               rec_row, items, labels, cfg)  # fmt: skip
    assert out.loss.dtype == torch.float32 and z_lp.grad.dtype == dtype
    assert out.loss.item() == pytest.approx(exp.loss.item(), rel=1e-6)


def test_teacher_gets_no_gradient() -> None:
    z, t, q, rec_row, items, labels = _random_case()
    z.requires_grad_(True)
    t.requires_grad_(True)
    conkd_loss_reference(z, t, q, rec_row, items, labels, LossConfig()).loss.backward()
    assert t.grad is None and z.grad is not None


def test_loss_row_without_rec_turn_is_an_error() -> None:
    z, t, q, rec_row, items, labels = _random_case()
    rec_row[3] = -1
    with pytest.raises(ValueError, match="recommender-turn row"):
        conkd_loss_reference(z, t, q, rec_row, items, labels, LossConfig())


# --- the gate ---------------------------------------------------------------------------


def test_item_mass_is_exact_and_stable() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4, 10, generator=g, dtype=torch.float64)
    items = torch.tensor([9, 0, 4])
    exp = torch.softmax(t, -1)[:, items].sum(-1)
    torch.testing.assert_close(item_mass(t, items), exp)
    huge = torch.tensor([[1e4, 1e4, -1e4, -float("inf")], [-1e4, 0.0, 1e4, 1e4]])
    m = item_mass(huge, torch.tensor([1, 3]))
    torch.testing.assert_close(m, torch.tensor([0.5, 0.5]))


def test_gate_modes() -> None:
    m = torch.tensor([0.5, 0.5000001, 0.2, 0.9, 0.0])
    labels = torch.tensor([7, 3, 1, IGNORE_INDEX, 9])
    items = torch.tensor([9, 3])

    def lam(**kw: object) -> list[float]:
        return gate(m, labels, items, GateConfig(**kw)).tolist()

    assert lam(mode="hard", eta=0.5) == [0.0, 1.0, 0.0, 1.0, 0.0]  # strict threshold
    assert lam(mode="hard", eta=0.1) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert lam(mode="hard", eta=1.0) == [0.0] * 5
    assert lam(mode="soft") == pytest.approx(m.tolist())
    assert lam(mode="static", c=0.25) == [0.25] * 5
    assert lam(mode="oracle") == [0.0, 1.0, 0.0, 0.0, 1.0]  # from labels, not m
    assert lam(mode="dialog") == [0.0] * 5
    assert lam(mode="rec") == [1.0] * 5


def test_gate_config_validation() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"loss\.gate\.eta"):
            GateConfig(eta=bad)
    GateConfig(eta=0.0)
    GateConfig(eta=1.0)
    with pytest.raises(ConfigError, match=r"loss\.gate\.c"):
        GateConfig(c=2.0)
    with pytest.raises(ConfigError, match=r"loss\.gate\.mode"):
        GateConfig(mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"loss\.gate\.eta"):
        build_config(LossConfig, overrides=["gate.eta=1.5"])
    assert build_config(LossConfig, overrides=["gate.mode=soft"]).gate.mode == "soft"
