"""On-device DBSCAN (Ester et al. 1996) and the k-distance elbow for eps.

DESIGN §3: core points, neighbourhoods and connected components, blockwise
(never N x N), under `jax.jit`, with labels equal to scikit-learn's DBSCAN.

Layout: points go to the leaves of a balanced kd-tree (median splits; on
the top-8 principal directions when D > 8), in
nb = 2^L blocks of B rows; block pairs whose bounds are more than eps apart
are skipped, so in low D a sweep costs ~N x (a few blocks), not N^2.

Distances: float32 d2 (difference form for D <= 8, else the matmul
expansion ||a||^2 + ||b||^2 - 2ab about the query block's centre) decides
every pair outside a band around eps that provably holds its rounding error;
the few pairs inside are decided in double-float32 (exact products of 12-bit
halves, TwoSum), as float64 would. So the core set is sklearn's even when eps
is itself a float32 distance of the data, as the k-distance elbow is.

Clustering, labels being row indices: (1) one sweep counts neighbours ->
cores; (2) hooking + pointer jumping (FastSV / Shiloach-Vishkin style): each
round, one sweep gives every core its min parent m over core neighbours, each
root takes its members' min m (scatter-min), each member takes its own, then
p = p[p] until all trees are stars -- O(log N) rounds, not the diameter; stop
at the first round without change; (3) one sweep gives each border point the
neighbouring cluster with the smallest lowest core index. That is sklearn's
rule: it numbers clusters by smallest core index and grows each fully before
the next, so a border point joins the lowest-numbered neighbouring cluster.
Labels thus equal sklearn's, numbering included.
"""
import functools
import typing

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

_BIG = 2**31 - 1                 # "no label" / +inf for int32 minima
_EXACT_MAX_DIM = 8               # up to this D, always the exact difference form
_MAX_REFINE = 512                # band pairs re-measured one by one per block pair ...
_MAX_EXACT = 256                 # ... and those then decided in double-float32
_KDIST_TAIL = 32                 # k-nearest re-measured exactly by kdistance_curve (D > 8)
_U = 2.0**-24                    # float32 unit roundoff


class _Layout(typing.NamedTuple):
  xb: jax.Array       # [nb, B, D] float32 points in kd-leaf order
  vb: jax.Array       # [nb, B] bool valid
  perm: jax.Array     # [nb * B] int32 original index of each row (>= N for padding)
  centre: jax.Array   # [nb, D] float32 mean of each block's valid points
  gap: jax.Array      # [nb, nb] float32 lower bound on distances between blocks (inf: empty)


def _order_space(x, valid):
  """[npad, D] -> [npad, min(D, 8)] coordinates to order the points by.

  D > 8: the top-8 principal directions (subspace iteration with matmuls
  only, so no other [npad, D] array is made): in high D one coordinate
  rarely separates groups, the leading directions of the spread do.
  """
  d = x.shape[1]
  if d <= _EXACT_MAX_DIM:
    return x
  w = valid.astype(jnp.float32)[:, None]
  mean = jnp.sum(x * w, 0) / jnp.maximum(jnp.sum(w), 1.0)
  v = jax.random.normal(jax.random.key(0), (d, _EXACT_MAX_DIM), jnp.float32)
  for _ in range(6):
    xv = (x @ v - mean @ v) * w                                 # centred projections
    v = jnp.linalg.qr(x.T @ xv - jnp.outer(mean, jnp.sum(xv, 0)))[0]
  return x @ v - mean @ v


def _kd_order(x, valid, levels):
  """Rows [npad, D] -> order [npad] int32 whose 2^levels equal ranges are kd-tree leaves.

  Each level splits every segment at its median along the coordinate where
  its valid points spread most; invalid rows sort last.
  """
  npad, d = x.shape
  nb = 2**levels
  rows = jnp.arange(npad, dtype=jnp.int32)
  x_lo, x_hi = jnp.where(valid[:, None], x, jnp.inf), jnp.where(valid[:, None], x, -jnp.inf)

  # One loop body for every level (segment ids, not shapes, change), so the
  # compiled program does not grow with the number of levels.
  def level(lev, carry):
    seg, _ = carry
    spread = jax.ops.segment_max(x_hi, seg, nb) - jax.ops.segment_min(x_lo, seg, nb)
    axis = jnp.argmax(spread, 1)[seg]                           # split axis per row
    val = jnp.where(valid, jnp.take_along_axis(x, axis[:, None], 1)[:, 0], jnp.inf)
    order = jnp.lexsort((val, seg)).astype(jnp.int32)
    half = npad // 2 // 2**lev                 # segment length after this split
    return jnp.zeros_like(seg).at[order].set(rows // half), order
  return lax.fori_loop(0, levels, level, (jnp.zeros((npad,), jnp.int32), rows))[1]


def _exact_d2(q, k):
  """[Bq, D], [Bk, D] -> [Bq, Bk] squared distances in the difference form.

  One [Bq, Bk] term per feature, unrolled (D <= 8 here): XLA fuses these 2-D
  ops into one vectorised loop, ~15x faster on CPU than reducing a
  [Bq, Bk, D] broadcast.
  """
  d2, kt = jnp.zeros((q.shape[0], k.shape[0]), jnp.float32), k.T
  for c in range(q.shape[1]):
    d2 = d2 + jnp.square(q[:, c:c + 1] - kt[c:c + 1, :])
  return d2


def _expanded_d2(q, k, centre):
  """Expansion-form d2 about `centre`, with ||a||^2 + ||b||^2 of the centred rows."""
  a, b = q - centre, k - centre
  na, nb = jnp.sum(a * a, -1)[:, None], jnp.sum(b * b, -1)[None, :]
  d2 = na + nb - 2.0 * jnp.dot(a, b.T, precision=lax.Precision.HIGHEST)
  return d2, na + nb


def _split(x):
  """x -> (hi, lo), x = hi + lo exactly, each with <= 12 significant bits.

  By masking bits (not Veltkamp's 4097*x trick, which FMA contraction on GPU
  would break), so products of halves are exact in float32.
  """
  hi = lax.bitcast_convert_type(
      lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-4096), jnp.float32)
  return hi, x - hi


def _two_sum(a, b):
  """Knuth's TwoSum: a + b = s + e exactly (no reassociation in XLA)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _square_terms(h, l):
  """Floats summing to (h + l)^2 within ~u^2 (h^2 exact from its halves)."""
  hh, hl = _split(h)
  return (hh * hh, 2 * hh * hl, hl * hl, 2 * h * l)


def _exact_le(qi, kj, eps_hi, eps_lo):
  """[K, D] pairs -> [K] bool: ||qi - kj||^2 <= (eps_hi + eps_lo)^2, in
  double-float32 arithmetic.

  Each term is carried as s + c with TwoSum (~2^-44 relative), summed over D
  as a tree, so the answer is float64's (what scikit-learn computes on the
  same float32 points) except for ties closer than ~1e-13 relative, which
  float64 rounds arbitrarily too.
  """
  dh, dl = _two_sum(qi, -kj)                      # the difference, exactly
  t = _square_terms(dh, dl)
  s, c = t[0], jnp.zeros_like(t[0])
  for term in t[1:]:
    s, e = _two_sum(s, term)
    c = c + e
  while s.shape[1] > 1:                           # pairwise over features
    if s.shape[1] % 2:
      s, c = jnp.pad(s, ((0, 0), (0, 1))), jnp.pad(c, ((0, 0), (0, 1)))
    s, e = _two_sum(s[:, 0::2], s[:, 1::2])
    c = c[:, 0::2] + c[:, 1::2] + e
  s, c = s[:, 0], c[:, 0]
  for term in _square_terms(eps_hi, eps_lo):
    s, e = _two_sum(s, -term)
    c = c + e
  return s + c <= 0   # round-to-nearest keeps the sign of the exact s + c


def _d2_band(q, k, centre, eps):
  """[B, D] x [B, D] -> float32 d2 [B, B] and (lo, hi): d2 <= lo proves
  ||q - k|| <= eps, d2 > hi proves the opposite; in between is undecided."""
  eps2 = eps[0] * eps[0]        # vs (hi + lo)^2: relative error <= 3.1 u
  d = q.shape[1]
  if d <= _EXACT_MAX_DIM:
    d2 = _exact_d2(q, k)        # relative error <= (D + 2) u
    tol = (2 * d + 8) * _U * eps2
  else:
    # Expansion error: gamma_D on norms and dot products, plus ~u from centring.
    d2, norms = _expanded_d2(q, k, centre)
    tol = (2 * d + 8) * _U * (norms + eps2)
  return d2, eps2 - tol, eps2 + tol


def _refine(sure, todo, decide, size):
  """Moves the True entries of `todo` [B, B] out of the undecided set.

  `decide(ii, jj)` -> (inside, undecided), [size] bool each, for up to `size`
  pairs at a time (gathered, so the work is O(size D) however large B is);
  the loop runs as many chunks as there are pairs, usually zero or one.
  Returns (sure | inside pairs, still undecided pairs).
  """
  def chunk(carry):
    sure, todo, left = carry
    ii, jj = jnp.nonzero(todo, size=size, fill_value=todo.shape[0])  # fill: dropped below
    inside, undecided = decide(ii, jj)
    return (sure.at[ii, jj].set(inside, mode="drop"),
            todo.at[ii, jj].set(False, mode="drop"),
            left.at[ii, jj].set(undecided, mode="drop"))
  sure, _, left = lax.while_loop(lambda c: jnp.any(c[1]), chunk,
                                 (sure, todo, jnp.zeros_like(todo)))
  return sure, left


def _within(q, k, kmask, centre, eps):
  """[B, D] x [B, D] -> [B, B] bool: ||q_i - k_j|| <= eps and kmask[j].

  Float32 d2 decides every pair outside its error band. In D > 8 the band of
  the expansion (~D u ||x||^2) is first narrowed by the difference form
  ((D + 2) u d2); what is still undecided (a few pairs, if any) goes to
  `_exact_le`.
  """
  bsz, d = q.shape
  rows = lambda i: jnp.minimum(i, bsz - 1)
  d2, lo, hi = _d2_band(q, k, centre, eps)
  sure = kmask[None, :] & (d2 <= lo)
  unsure = kmask[None, :] & (d2 > lo) & (d2 <= hi)
  if d > _EXACT_MAX_DIM:
    eps2 = eps[0] * eps[0]
    lo2, hi2 = eps2 * (1 - (d + 8) * _U), eps2 * (1 + (d + 8) * _U)

    def difference_form(ii, jj):
      dd = jnp.sum(jnp.square(q[rows(ii)] - k[rows(jj)]), 1)
      return dd <= lo2, (dd > lo2) & (dd <= hi2)
    sure, unsure = _refine(sure, unsure, difference_form, min(_MAX_REFINE, bsz * bsz))

  def double_float(ii, jj):
    inside = _exact_le(q[rows(ii)], k[rows(jj)], *eps)
    return inside, jnp.zeros_like(inside)
  return _refine(sure, unsure, double_float, min(_MAX_EXACT, bsz * bsz))[0]


def _pair_stats(q, k, kmask, values, centre, eps, exact_count):
  """The two reductions a sweep needs, over key points j with kmask[j] and
  ||q_i - k_j|| <= eps: their count [B] and the min of values[j] [B] (int32
  in [0, 2^30); _BIG where there is none).

  The fast path is one fused pass that also notices undecided pairs that
  could change the result -- for the count if `exact_count`, else for the
  min -- and only then (rare) redoes the block pair through `_within`.
  """
  d2, lo, hi = _d2_band(q, k, centre, eps)
  maybe = kmask[None, :] & (d2 <= hi)
  # Sure pairs count 1, undecided ones 2^16 (B < 2^16): one sum, both counts.
  total = jnp.sum(jnp.where(maybe, jnp.where(d2 <= lo, 1, 1 << 16), 0), 1, dtype=jnp.int32)
  # key = 2 value + undecided: an even minimum is a sure pair that no
  # undecided pair could beat; an odd one needs the exact decision.
  best = jnp.min(jnp.where(maybe, 2 * values[None, :] + (d2 > lo), _BIG), 1)
  undecided = jnp.where(exact_count, jnp.any(total >= 1 << 16),
                        jnp.any((best != _BIG) & (best % 2 == 1)))

  def exact():
    adj = _within(q, k, kmask, centre, eps)
    return (jnp.sum(adj, 1, dtype=jnp.int32),
            jnp.min(jnp.where(adj, values[None, :], _BIG), 1))
  return lax.cond(undecided, exact, lambda: (total, jnp.where(best == _BIG, _BIG, best // 2)))


def _layout(points, valid, block_size):
  """Pads, kd-orders and blocks the points; bounds between blocks for pruning."""
  if points.ndim != 2:
    raise ValueError(f"points must be [N, D], got shape {points.shape}")
  if not 8 <= block_size <= 16384:   # counts are packed into 16 bits
    raise ValueError(f"block_size={block_size} must be in [8, 16384]")
  n, d = points.shape
  if n >= 2**30:                      # labels are doubled in `_pair_stats`
    raise ValueError(f"N={n} points: at most 2^30 - 1 are supported")
  valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid).astype(bool)
  if valid.shape != (n,):
    raise ValueError(f"valid has shape {valid.shape}, expected ({n},)")
  # 2^levels blocks (the kd splits are halvings) of about block_size rows.
  levels = max(0, (-(-n // block_size) - 1).bit_length())
  nb = 2**levels
  bsz = -(-n // nb // 8) * 8 if n > nb else 8
  npad = nb * bsz
  x = jnp.pad(points.astype(jnp.float32), ((0, npad - n), (0, 0)))
  v = jnp.pad(valid, (0, npad - n))
  perm = _kd_order(_order_space(x, v), v, levels)
  xb, vb = x[perm].reshape(nb, bsz, d), v[perm].reshape(nb, bsz)
  # Two lower bounds on the distance between blocks i and j: their boxes'
  # gap (tight in low D) and their balls' (centre distance - radii; better
  # in high D). Computed row by row: never [nb, nb, D].
  w = vb[..., None]
  centre = jnp.sum(xb * w, 1) / jnp.maximum(jnp.sum(w, 1), 1)
  radius = jnp.sqrt(jnp.max(jnp.where(vb, jnp.sum(jnp.square(xb - centre[:, None]), -1), 0.0), 1))
  lo = jnp.min(jnp.where(w, xb, jnp.inf), 1)
  hi = jnp.max(jnp.where(w, xb, -jnp.inf), 1)

  def row(args):
    c, r, l, h = args
    box = jnp.sqrt(jnp.sum(jnp.square(jnp.maximum(jnp.maximum(lo - h, l - hi), 0.0)), -1))
    ball = jnp.sqrt(jnp.sum(jnp.square(centre - c), -1)) - r - radius
    return jnp.maximum(box, ball)
  gap = lax.map(row, (centre, radius, lo, hi))
  # The bounds' float32 rounding is below (D + 2) u (|gap| + |coordinates|):
  # shave 8x that off, so pruning never drops a pair within eps.
  scale = jnp.max(jnp.where(v, jnp.sqrt(jnp.sum(jnp.square(x), -1)), 0.0))
  gap = jnp.maximum(gap - 8 * (d + 2) * _U * (jnp.abs(gap) + scale), 0.0)
  some = jnp.any(vb, 1)
  gap = jnp.where(some[:, None] & some[None, :], gap, jnp.inf)
  return _Layout(xb, vb, perm, centre, gap)


def _sweep(rel, init, body):
  """out[i] = body folded over the key blocks j with rel[i, j] (in order of j).

  rel: [nb, nb] bool; init: pytree of [nb, B] accumulators; body(i, j, acc)
  -> acc for query block i. Only the listed key blocks are visited (a
  dynamic-length loop), so pruned pairs cost nothing.
  """
  nb = rel.shape[0]

  def per_query(i, out):
    row = rel[i]
    js = jnp.nonzero(row, size=nb, fill_value=0)[0]
    acc = lax.fori_loop(0, jnp.sum(row, dtype=jnp.int32),
                        lambda t, acc: body(i, js[t], acc),
                        jax.tree.map(lambda a: a[i], out))
    return jax.tree.map(lambda a, b: a.at[i].set(b), out, acc)
  return lax.fori_loop(0, nb, per_query, init)


def _pointer_jump(f):
  """Parents -> roots: p = p[p] until stable (log2(depth) steps)."""
  def step(carry):
    f, _ = carry
    g = f[f]
    return g, jnp.any(g != f)
  return lax.while_loop(lambda c: c[1], step, (f, jnp.array(True)))[0]


def dbscan(points, eps, min_samples, *, valid=None, block_size=256, return_core=False,
           return_rounds=False):
  """DBSCAN labels, equal to `sklearn.cluster.DBSCAN(eps, min_samples)`'s.

  Args:
    points: [N, D] float, read as float32; Euclidean distance.
    eps: scalar neighbourhood radius, inclusive (distance <= eps): a python
      float / numpy scalar (kept to float64 precision as a float32 pair), or
      a 0-d array, which may be traced (one compile for all eps).
    min_samples: static int >= 1: a point is core when at least this many
      valid points, itself included, lie within eps.
    valid: optional [N] bool; False rows (padding) are ignored and get -1.
    block_size: about this many rows per block (static); temporaries are
      O(block_size^2 + N D + (N / block_size)^2), never N^2.
    return_core: also return the core mask [N] bool (sklearn's
      `core_sample_indices_` as a mask).
    return_rounds: also return the number of hooking rounds, int32 (each one
      blockwise sweep; the last one is the sweep that saw no change).
  Returns:
    labels [N] int32: -1 for noise and padding, clusters 0..k-1 numbered by
    their smallest core-point index; with return_core / return_rounds, the
    tuple (labels, core, rounds) of those asked for, in that order.
  """
  if not isinstance(min_samples, int) or isinstance(min_samples, bool) or min_samples < 1:
    raise ValueError(f"min_samples={min_samples!r} must be an int >= 1")
  if isinstance(eps, (int, float, np.generic, np.ndarray)):
    # A concrete float64 eps splits exactly-enough into hi + lo float32s, so
    # the comparison is against sklearn's eps, not its float32 rounding.
    eps = float(eps)
    if not eps >= 0:
      raise ValueError(f"eps={eps} must be >= 0")
    hi = np.float32(eps)
    eps = (hi, np.float32(eps - float(hi)))
  else:
    eps = (jnp.asarray(eps, jnp.float32), jnp.float32(0))
  labels, core, rounds = _dbscan(points, eps, valid, min_samples=min_samples,
                                 block_size=block_size)
  extra = (core,) * return_core + (rounds,) * return_rounds
  return (labels, *extra) if extra else labels


@functools.partial(jax.jit, static_argnames=("min_samples", "block_size"))
def _dbscan(points, eps, valid, *, min_samples, block_size):
  """`dbscan` with eps as a (hi, lo) float32 pair -> (labels, core, rounds)."""
  n = points.shape[0]
  eps = (jnp.asarray(eps[0], jnp.float32), jnp.asarray(eps[1], jnp.float32))
  lay = _layout(points, valid, block_size)
  xb, vb, centre = lay.xb, lay.vb, lay.centre
  nb, bsz = vb.shape
  near = lay.gap <= eps[0] + eps[1]          # [nb, nb] block pairs that may be neighbours

  core_flat = jnp.zeros((nb * bsz,), bool)
  rows = jnp.arange(nb * bsz, dtype=jnp.int32)

  # Every pass is the same blockwise sweep -- only the block pairs, the key
  # points and the values differ -- so it is compiled once, inside one loop:
  #   COUNT  (once):         neighbours of every point -> core points;
  #   HOOK   (until stable): min parent over core neighbours, hook, jump;
  #   BORDER (once):         min cluster name over core neighbours.
  count_pass, hook_pass, border_pass, done = range(4)

  def one_pass(carry):
    phase, f, core, name, rounds = carry
    fb, coreb = f.reshape(nb, bsz), core.reshape(nb, bsz)
    any_core = jnp.any(coreb, 1)
    # HOOK: a key block can lower some m only if it holds a parent below the
    # query block's largest (m <= f): once a cluster is one star it is skipped.
    kmin = jnp.min(jnp.where(coreb, fb, _BIG), 1)
    qmax = jnp.max(jnp.where(coreb, fb, -1), 1)
    hook_rel = near & any_core[:, None] & any_core[None, :] & (kmin[None, :] < qmax[:, None])
    border_rel = near & jnp.any(vb & ~coreb, 1)[:, None] & any_core[None, :]
    rel = jnp.select([phase == count_pass, phase == hook_pass], [near, hook_rel], border_rel)
    kmask = jnp.where(phase == count_pass, vb, coreb)
    values = jnp.where(phase == border_pass, name.reshape(nb, bsz), fb)
    init = (jnp.zeros((nb, bsz), jnp.int32), jnp.where(phase == hook_pass, fb, _BIG))

    def body(i, j, acc):
      c, m = _pair_stats(xb[i], xb[j], kmask[j], values[j], centre[i], eps, phase == count_pass)
      return acc[0] + c, jnp.minimum(acc[1], m)
    count, best = (a.reshape(-1) for a in _sweep(rel, init, body))

    def after_count():
      return hook_pass, f, vb.reshape(-1) & (count >= min_samples), name, rounds

    def after_hook():
      m = jnp.where(core, best, f)
      g = f.at[f].min(m)          # each root takes its members' best neighbour
      g = jnp.minimum(g, m)       # ... and each member hooks there directly
      g = _pointer_jump(g)        # g[x] <= x throughout, so no cycles can form
      # Stable: name each component by its smallest original core index.
      low = jnp.full_like(f, _BIG).at[g].min(jnp.where(core, lay.perm, _BIG))
      stable = jnp.all(g == f)
      return (jnp.where(stable, border_pass, hook_pass), g, core,
              jnp.where(core, low[g], _BIG), rounds + 1)

    def after_border():
      return done, f, core, jnp.where(core, name, jnp.where(vb.reshape(-1), best, _BIG)), rounds
    return lax.switch(jnp.minimum(phase, 2), [after_count, after_hook, after_border])

  init = (jnp.int32(count_pass), rows, core_flat, jnp.full((nb * bsz,), _BIG, jnp.int32), jnp.int32(0))
  _, _, core, name, rounds = lax.while_loop(lambda c: c[0] != done, one_pass, init)

  # Back to input order; names (smallest core index) -> contiguous 0..k-1 by rank.
  name = jnp.zeros((nb * bsz,), jnp.int32).at[lay.perm].set(name)[:n]
  core = jnp.zeros((nb * bsz,), bool).at[lay.perm].set(core)[:n]
  starts = jnp.zeros((n,), bool).at[name].set(True, mode="drop")   # _BIG is dropped
  rank = jnp.cumsum(starts, dtype=jnp.int32) - 1
  labels = jnp.where(name < _BIG, rank[jnp.minimum(name, n - 1)], -1)
  return labels, core, rounds


@functools.partial(jax.jit, static_argnames=("k", "block_size"))
def kdistance_curve(points, k, *, valid=None, block_size=256):
  """Sorted k-distances: [N, D] -> [N] float32 ascending, +inf for padding.

  A point's k-distance is its distance to its k-th nearest valid point,
  *counting itself as the first* -- what `NearestNeighbors(n_neighbors=k)
  .fit(X).kneighbors(X)` returns in its last column. With k = min_samples
  (Schubert et al. 2017: k = minPts), a point is core at eps exactly when its
  k-distance is <= eps. Points with fewer than k valid points get +inf.

  Blockwise: each query block keeps a running [B, k] of its smallest squared
  distances (and their rows); key blocks are visited nearest-bound first and
  the visit stops once the next bound is beyond the block's k-th distance.
  In D > 8 the expansion picks the k nearest and the last `_KDIST_TAIL` of
  them are re-measured in the difference form, whose max is the k-distance
  (exact unless the expansion misorders points by more than that many places).
  """
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k={k!r} must be an int >= 1")
  n = points.shape[0]
  lay = _layout(points, valid, block_size)
  xb, vb = lay.xb, lay.vb
  nb, bsz, d = xb.shape
  exact = d <= _EXACT_MAX_DIM

  def per_query(i, out):
    order = jnp.argsort(lay.gap[i])

    def more(carry):
      t, best, _ = carry
      bound = jnp.max(jnp.where(vb[i], best[:, -1], 0.0))
      return (t < nb) & (jnp.square(lay.gap[i, order[jnp.minimum(t, nb - 1)]]) <= bound)

    def visit(carry):
      t, best, rows = carry
      j = order[t]
      if exact:
        d2 = _exact_d2(xb[i], xb[j])
      else:
        d2 = jnp.maximum(_expanded_d2(xb[i], xb[j], lay.centre[i])[0], 0.0)
      d2 = jnp.where(vb[j][None, :], d2, jnp.inf)
      cand = jnp.concatenate([rows, jnp.broadcast_to(j * bsz + jnp.arange(bsz), (bsz, bsz))], 1)
      neg, pos = lax.top_k(-jnp.concatenate([best, d2], 1), k)   # k smallest, ascending
      return t + 1, -neg, jnp.take_along_axis(cand, pos, 1)
    init = (0, jnp.full((bsz, k), jnp.inf, jnp.float32), jnp.zeros((bsz, k), jnp.int32))
    _, best, rows = lax.while_loop(more, visit, init)
    kth = best[:, -1]
    if not exact:
      tail = rows[:, -min(k, _KDIST_TAIL):]                      # [B, T] rows
      diff = xb.reshape(nb * bsz, d)[tail] - xb[i][:, None, :]   # [B, T, D]
      kth = jnp.where(jnp.isfinite(kth), jnp.max(jnp.sum(jnp.square(diff), -1), 1), jnp.inf)
    return out.at[i].set(kth)

  kth = lax.fori_loop(0, nb, per_query, jnp.full((nb, bsz), jnp.inf, jnp.float32))
  kth = jnp.where(vb, jnp.sqrt(kth), jnp.inf).reshape(-1)
  return jnp.sort(kth)[:n]   # padding rows are +inf, so they sort last


@jax.jit
def elbow(curve):
  """Value of an ascending curve [N] (+inf padding at the end) at its elbow.

  Both axes are scaled to [0, 1] over the finite part; the elbow is the point
  farthest from the chord joining the first and last points (in those units
  the distance is |x - y| / sqrt(2)). First such point on ties.
  """
  curve = jnp.asarray(curve, jnp.float32)
  idx = jnp.arange(curve.shape[0])
  count = jnp.sum(jnp.isfinite(curve))
  last = jnp.maximum(count - 1, 0)
  x = idx / jnp.maximum(last, 1)
  lo, hi = curve[0], curve[last]
  y = (curve - lo) / jnp.maximum(hi - lo, 1e-30)
  dist = jnp.where(idx < count, jnp.abs(x - y), -1.0)
  return curve[jnp.argmax(dist)]


def kdistance_eps(points, k, *, valid=None, block_size=256):
  """eps for DBSCAN(min_samples=k): the elbow of `kdistance_curve` (scalar)."""
  return elbow(kdistance_curve(points, k, valid=valid, block_size=block_size))
