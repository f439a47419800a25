"""Example pipeline files, packaged so that a bare name (``streamrank search --pipeline hybrid``) resolves
from an installed wheel as well as from a checkout."""
