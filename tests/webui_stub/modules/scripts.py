"""The Script base class and the list the X/Y/Z plot script is found in."""

AlwaysVisible = object()
scripts_data = []  # ScriptClassData-like entries: .script_class, .module


class Script:
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    # The hooks process_images calls, no-ops as in A1111's base class.
    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def post_sample(self, p, ps, *args):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass
