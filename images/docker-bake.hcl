# The two images of kubellama, built from the repository root:
#   docker buildx bake -f images/docker-bake.hcl [--push] [train|cpu]
# Base images and the torch version are pinned here and nowhere else; the Dockerfiles take them as build args.
# Tags match the defaults of cluster.image_train / cluster.image_cpu (conf/schema/cluster.py).

variable "REGISTRY" { default = "ghcr.io/kubellama" }
variable "VERSION" { default = "0.1.0" }

# CUDA 12.8 + cuDNN 9 runtime with torch preinstalled; the NCCL inside it drives the GPU jobs.
variable "TRAIN_BASE" { default = "pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime" }
# Data prep, eval and the pipeline-upload Job need no GPU.
variable "CPU_BASE" { default = "python:3.11.14-slim-bookworm" }
# Same pin as the Makefile's TORCH: the CPU image installs this from the CPU wheel index.
variable "TORCH_VERSION" { default = "2.13.0" }

group "default" {
  targets = ["train", "cpu"]
}

target "train" {
  context    = "."
  dockerfile = "images/Dockerfile.train"
  args       = { BASE_IMAGE = TRAIN_BASE }
  tags       = ["${REGISTRY}/train:${VERSION}"]
  platforms  = ["linux/amd64"]
}

target "cpu" {
  context    = "."
  dockerfile = "images/Dockerfile.cpu"
  args       = { BASE_IMAGE = CPU_BASE, TORCH_VERSION = TORCH_VERSION }
  tags       = ["${REGISTRY}/cpu:${VERSION}"]
  platforms  = ["linux/amd64", "linux/arm64"]
}
