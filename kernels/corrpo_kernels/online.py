"""Online softmax moments shared by the kernels (SPEC 2).

A row's entries seen so far are held as their maximum ``m`` (in logit units) and three
moments relative to it, u = (z - m) / tau:  S0 = sum e^u,  S1 = sum e^u u,  S2 = sum e^2u.
The emitted token is kept out of the moments and merged at the end, so that
G = ||p - e_y|| = sqrt(S0'^2 + S2') / S0 is formed from positive terms only, without the
cancellation of 1 - 2 p_y + sum p^2 when p_y is close to 1.

Every helper works on a tile of rows at once: moments are [R] vectors, logits [R, C].
"""

import triton
import triton.language as tl

# The lowest finite float32: the starting maximum. Starting at -inf would make (z - m) NaN
# for -inf entries; with S0 = 0 the starting value carries no weight.
LOWEST = tl.constexpr(-3.4028234663852886e38)

# Fault codes per row, in the order the native core checks them.
OK = tl.constexpr(0)
NON_FINITE = tl.constexpr(1)
ALL_NEG_INF = tl.constexpr(2)
TOKEN_OUT_OF_RANGE = tl.constexpr(3)
IMPOSSIBLE_TOKEN = tl.constexpr(4)


@triton.jit
def start(ROWS: tl.constexpr):
    """Moments of no entries for ROWS rows: m, S0, S1, S2, and the non-finite flag."""
    zero = tl.zeros([ROWS], tl.float32)
    return tl.full([ROWS], LOWEST, tl.float32), zero, zero, zero, tl.zeros([ROWS], tl.int32)


@triton.jit
def rescale(m, s0, s1, s2, m_new, inv_tau):
    """Moments relative to m, re-expressed relative to m_new >= m."""
    d = (m_new - m) * inv_tau
    scale = tl.exp(-d)
    # When the rise underflows the scale, the old moments vanish; d * s0 may be inf there.
    s1 = tl.where(scale > 0, scale * (s1 - d * s0), 0.0)
    return s0 * scale, s1, s2 * (scale * scale)


@triton.jit
def fold(m, s0, s1, s2, bad, z, inside, keep, inv_tau):
    """Folds a [R, C] tile of float32 logits into the moments.

    inside: entries that belong to the rows (in the vocabulary), checked for NaN and +inf;
    keep: the entries that count towards the moments (inside, and not the emitted token).
    """
    nonfinite = inside & ((z != z) | (z == float("inf")))
    bad = bad | tl.max(nonfinite.to(tl.int32), axis=1)
    z = tl.where(keep, z, float("-inf"))
    m_new = tl.maximum(m, tl.max(z, axis=1))
    s0, s1, s2 = rescale(m, s0, s1, s2, m_new, inv_tau)
    u = (z - m_new[:, None]) * inv_tau
    e = tl.exp(u)
    s0 += tl.sum(e, axis=1)
    s1 += tl.sum(tl.where(e > 0, e * u, 0.0), axis=1)
    s2 += tl.sum(e * e, axis=1)
    return m_new, s0, s1, s2, bad


@triton.jit
def merge(m, s0, s1, s2, m_b, s0_b, s1_b, s2_b, inv_tau):
    """Moments of the union of two disjoint sets of entries."""
    m_new = tl.maximum(m, m_b)
    a0, a1, a2 = rescale(m, s0, s1, s2, m_new, inv_tau)
    b0, b1, b2 = rescale(m_b, s0_b, s1_b, s2_b, m_new, inv_tau)
    return m_new, a0 + b0, a1 + b1, a2 + b2


@triton.jit
def finish(m, s0, s1, s2, z_y, inv_tau):
    """entropy, logprob, collision, grad_norm from the moments of the other entries and the
    emitted token's logit z_y."""
    top = tl.maximum(m, z_y)
    o0, o1, o2 = rescale(m, s0, s1, s2, top, inv_tau)
    d_y = (z_y - top) * inv_tau
    e_y = tl.exp(d_y)
    t0 = o0 + e_y
    t1 = o1 + tl.where(e_y > 0, e_y * d_y, 0.0)
    ln_t0 = tl.log(t0)
    entropy = tl.maximum(ln_t0 - t1 / t0, 0.0)
    logprob = tl.minimum(d_y - ln_t0, 0.0)
    collision = (o2 + e_y * e_y) / (t0 * t0)
    grad_norm = tl.sqrt(o0 * o0 + o2) / t0
    return entropy, logprob, collision, grad_norm


@triton.jit
def fault(y, vocab, bad, s0, z_y):
    """The row's fault code (OK when its statistics are valid)."""
    code = tl.where(z_y == float("-inf"), tl.where(s0 > 0, IMPOSSIBLE_TOKEN, ALL_NEG_INF), OK)
    code = tl.where(bad != 0, NON_FINITE, code)
    return tl.where((y < 0) | (y >= vocab), TOKEN_OUT_OF_RANGE, code)


@triton.jit
def store(stats_ptr, fault_ptr, rows, n_rows, entropy, logprob, collision, grad_norm, code):
    """Writes a tile's results: stats [4, n_rows] (NaN where the row is faulty), faults [n_rows]."""
    valid = rows < n_rows
    nan = float("nan")
    ok = code == OK
    tl.store(stats_ptr + rows, tl.where(ok, entropy, nan), mask=valid)
    tl.store(stats_ptr + n_rows + rows, tl.where(ok, logprob, nan), mask=valid)
    tl.store(stats_ptr + 2 * n_rows + rows, tl.where(ok, collision, nan), mask=valid)
    tl.store(stats_ptr + 3 * n_rows + rows, tl.where(ok, grad_norm, nan), mask=valid)
    tl.store(fault_ptr + rows, code.to(tl.int8), mask=valid)
