"""Negative Image Prompt for AUTOMATIC1111: the one entry script; everything else is in lib_negip.

A1111 executes every file in scripts/ and does not register it in sys.modules, so this file
stays minimal: no dataclasses, no postponed annotations.
"""

import modules.scripts as scripts

from lib_negip import host


class NegativeImagePromptScript(scripts.Script):
    def title(self):
        return host.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from lib_negip import ui

        return ui.build(self, is_img2img)

    def process(self, p, *args):
        host.process(p, args)

    def post_sample(self, p, ps, *args):
        host.post_sample(p)

    def postprocess(self, p, processed, *args):
        host.postprocess(p)


host.register()
