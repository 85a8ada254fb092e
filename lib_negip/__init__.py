"""Negative Image Prompt: IP-Adapter image prompts, positive and negative, for Stable Diffusion.

The package never imports A1111 at module level: only ``lib_negip.webui`` touches
``modules.*``, lazily. Everything else takes plain tensors and ``nn.Module``s.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

#: The one logger of the extension; A1111 shows its records in the console.
logger = logging.getLogger("negip")
