"""`python -m retina.datasets`: runs retina.data.datasets (its --help says what it does)."""
from retina.data.datasets import main

if __name__ == '__main__':
    main()
