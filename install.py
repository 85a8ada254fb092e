"""Installs what Negative Image Prompt needs and A1111 lacks; A1111 runs it at start.

A1111 1.10 already ships every runtime dependency (torch, safetensors, open-clip-torch 2.20,
Pillow, numpy), so on a stock install this does nothing. It never upgrades or replaces a
package A1111 pins (open-clip-torch above all), and does nothing under --skip-install.
"""

import launch

# import name -> pip requirement used only when the import name is missing entirely
REQUIREMENTS = {
    "safetensors": "safetensors",
    "open_clip": "open-clip-torch",
}


def main() -> None:
    if getattr(launch.args, "skip_install", False):
        return
    for module, requirement in REQUIREMENTS.items():
        if not launch.is_installed(module):
            launch.run_pip(f"install {requirement}", f"{requirement} for Negative Image Prompt")


main()
