"""Numbers shared by the ops and their kernels."""
import math

LOG2E = math.log2(math.e)  # scores are kept in base 2 inside the kernels (exp2 / log2)
LN2 = math.log(2.0)
NORM_EPS = 1e-12  # the clamp of every L2 norm, as F.normalize
