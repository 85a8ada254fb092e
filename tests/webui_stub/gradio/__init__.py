"""The few gradio names the settings registration touches (the tests build no UI)."""


class Component:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


class Slider(Component):
    pass


class Checkbox(Component):
    pass


class Textbox(Component):
    pass


class Dropdown(Component):
    pass


def update(**kwargs):
    """gradio 3's update: a dict the front end applies to a component (nothing: no change)."""
    return {"__type__": "update", **kwargs}
