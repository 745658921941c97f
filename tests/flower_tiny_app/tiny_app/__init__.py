"""A tiny Flower app: FedAvg of one array, fed to FLStore, which picks the clients of round 2."""
