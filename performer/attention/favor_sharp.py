"""FAVOR#, symmetric data-aligned variant (SADERF; Likhosherstov et al.,
"FAVOR#: Sharp Attention Kernel Approximations via New Classes of Positive
Random Features", 2022).

Each dimension is rescaled, x -> Psi x and y -> Psi^-1 y with
Psi_l = (E[y_l^2] / E[x_l^2])^(1/4), which keeps x.y exact and balances the
query and key norms, so |x + y|^2, and with it the estimator's variance,
shrinks; then FAVOR++ runs on the aligned pair. Psi comes from the same
moments as FAVOR++'s A, under the same causality rule.
"""

from performer.attention import favor_plus_plus


class FavorSharp(favor_plus_plus.FavorPlusPlus):
  aligned = True
