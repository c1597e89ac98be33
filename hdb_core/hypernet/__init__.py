"""The hypernetwork: model, file, image encoder."""
