"""A plain Flower app that trains with IAU-Fed, lets a client withdraw and removes its influence."""
