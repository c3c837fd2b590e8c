"""Code two or more services use: settings, logging, errors, Redis, protocol codecs."""
