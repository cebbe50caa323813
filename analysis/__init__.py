"""Measuring sharpness (Foret et al. Sections 4.1 and 4.2): the Hessian spectrum, m-sharpness and
loss landscapes of a trained model. `python sharpness.py RUN` is the command line."""
