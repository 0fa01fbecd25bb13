"""Built-in isofs providers, registered through the `isofs.providers` entry points."""
