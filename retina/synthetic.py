"""`python -m retina.synthetic`: runs retina.data.synthetic (its --help says what it does)."""
from retina.data.synthetic import main

if __name__ == '__main__':
    main()
