"""End devices: the cameras' views and the camera network that runs on each of them."""
