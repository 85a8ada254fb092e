"""Negative Image Prompt for AUTOMATIC1111: the one entry script; everything else is in lib_negip.

A1111 executes every file in scripts/ and does not register it in sys.modules, so this file
stays minimal: no dataclasses, no postponed annotations.
"""

import modules.scripts as scripts

from lib_negip.webui import TITLE, generation, register


class NegativeImagePromptScript(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from lib_negip.webui import ui

        return ui.build(self, is_img2img)

    def process(self, p, *args):
        generation.process(p, args)

    def before_process_batch(self, p, *args, **kwargs):
        generation.before_batch(p)

    def process_batch(self, p, *args, **kwargs):
        generation.process_batch(p)

    def post_sample(self, p, ps, *args):
        generation.post_sample(p)

    def postprocess(self, p, processed, *args):
        generation.postprocess(p)


register.register()
