"""Options, the loaded model, command-line options and the job state."""

from types import SimpleNamespace


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, **kwargs):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.section = kwargs.get("section")


class Options(SimpleNamespace):
    """Attribute access like ``shared.opts``; ``add_option`` stores the default."""

    def add_option(self, key, info):
        self.data_labels[key] = info
        if not hasattr(self, key):
            setattr(self, key, info.default)


def default_opts() -> Options:
    return Options(
        data_labels={},
        batch_cond_uncond=True,
        pad_cond_uncond=False,
        pad_cond_uncond_v0=False,
        skip_early_cond=0.0,
        s_min_uncond_all=False,
        upcast_attn=False,
    )


opts = default_opts()
cmd_opts = SimpleNamespace(data_dir=".", api=True, api_auth=None)
sd_model = None
state = SimpleNamespace(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
