"""Device profiles (TOML files in this package, installed as `edgelearn.profiles`)."""
