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
