"""Devices and processes: the ("data", "model") mesh and its sharding rules (`sharding`), multi-process start-up
and each process's rows of a batch (`distributed`). Training, evaluation, calibration and compression all use
them, so they sit below every one of those layers and import none of them."""
