"""The launcher: in process, torchrun, torchx, or a Kubernetes job (TrainJob or Volcano)."""
