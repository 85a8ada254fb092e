"""Stand-in of A1111's modules/safe.py: what the glue takes from it.

A1111 replaces ``torch.load`` with a checker that refuses zip entries written by current torch
(".format_version") and keeps the original as ``unsafe_torch_load``. The stand-in does not
replace ``torch.load`` (that would change every other test in the process); it only offers the
original under A1111's name.
"""

import torch

unsafe_torch_load = torch.load
