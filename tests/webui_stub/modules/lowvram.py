"""A1111's --lowvram / --medvram module: the part of the model it holds on the GPU."""

sent_to_cpu = 0


def send_everything_to_cpu() -> None:
    global sent_to_cpu
    sent_to_cpu += 1


def is_enabled(sd_model) -> bool:
    return getattr(sd_model, "lowvram", False)
