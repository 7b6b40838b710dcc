"""Shared test settings."""

import torch

# On a 2-core machine shared with other work, intra-op threads contend and made
# small-tensor tests about 10× slower; one thread is the fast and stable choice.
torch.set_num_threads(1)
