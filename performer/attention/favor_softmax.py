"""FAVOR+ (Choromanski et al. 2021): positive random features for softmax.

phi(x) = exp(w.x - |x|^2/2) / sqrt(m), w orthogonal Gaussian rows: an
unbiased estimate of exp(x.y) whose variance stays small for small |x + y|.
"""

from performer.attention import feature_map as fm


class FavorSoftmax(fm.ExpFeatureMap):
  def logits(self, x, ctx, *, key):
    del ctx, key
    xs = fm.scaled(x)
    return fm.project(xs, self.w) - fm.half_sq_norm(xs)[..., None]

  def query_logits(self, x, ctx):
    # -|x|^2/2 is constant along the row and cancels with the row maximum.
    return fm.project(fm.scaled(x), self.w)
