"""The experiment gin files, installed as the package data of ``attnlab.experiments``."""
