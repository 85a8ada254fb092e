"""The host glue: everything that talks to the web UI (A1111 1.10 and its forks).

Only the modules of this package import the host's ``modules.*`` (lazily, inside functions),
so the engine in ``lib_negip`` runs and is tested without a web UI. One job per module:

``backend``     which web UI runs us (A1111, Forge, reForge, Classic) and where its UNet is
``settings``    the Settings-tab options and their reading
``failures``    errors turned into what reaches the user (HTTP 422 in the API, the UI's message)
``models``      the model folders, the registry and the caches of loaded models
``generation``  one generation: ``process``, the denoiser callback, ``post_sample``, ``postprocess``
``xyz``         the X/Y/Z plot axes
``register``    the callbacks, the settings and the ``GET /negip/v1/models`` route
``ui``          the gradio accordion
"""

from __future__ import annotations

TITLE = "Negative Image Prompt"
