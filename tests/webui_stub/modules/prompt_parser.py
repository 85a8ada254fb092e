"""A1111's SDXL conditioning container: a dict whose ``.shape`` is its crossattn's shape."""


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape
