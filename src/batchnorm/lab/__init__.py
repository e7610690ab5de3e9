"""The lab: measures on real data what batch normalization buys (`batchnorm lab`)."""
