"""Device profiles (TOML files in this package); loaded by `edgelearn.devices`."""
