"""Models: timm's factory with our data, our own architectures, model directories, forward-pass precision."""
