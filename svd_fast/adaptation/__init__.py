"""Adapting a model before steering: the PEFT warm start (`training`), the calibration of mu (`calibration`)
and the prompt/answer examples both take (`examples`)."""
