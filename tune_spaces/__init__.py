"""Ray Tune search spaces for the OSRO fusion factors k, alpha, beta (paper Eq. 13-15) and the SDE's lambda."""
