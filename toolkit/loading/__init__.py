"""Loading by share: a meta-device model, this rank's part of it decided by the layout, and
safetensors slice reads of exactly that part (toolkit.loading.build)."""
