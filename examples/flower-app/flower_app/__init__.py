"""flower-app: the digits CNN trained federated with Flower, every round landing in FLStore."""
