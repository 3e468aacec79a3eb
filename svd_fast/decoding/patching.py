"""Temporarily replacing module forwards (the small-batch linear routing, steering's LoRA row split)."""
import contextlib


@contextlib.contextmanager
def replaced_forwards(replacements):
    """For each (module, forward) pair, module(...) calls `forward` while the context is active. The
    module's own instance-level forward, if it had one, comes back on exit, also when the body raises."""
    own = [module.__dict__.get("forward") for module, _ in replacements]
    try:
        for module, forward in replacements:
            module.__dict__["forward"] = forward  # an instance attribute shadows the class's forward
        yield
    finally:
        for (module, _), forward in zip(replacements, own):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward
