"""Reading and writing pixels: raw FITS, the Butler repository and the image distributor client."""
