"""The FUSE front end: pyfuse3 operations that translate requests into `isofs.core` calls."""
