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
