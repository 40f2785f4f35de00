#!/usr/bin/env python
"""Crop the photographs to the eye, make them square and resize them: step 1 of the pipeline.

    python convert.py --directory data/train --convert_directory data/train_medium --crop_size 512
    python convert.py --directory data/test --convert_directory data/test_medium --crop_size 512
    python convert.py --test      # look at a few crops first

The work is done by retina.data.crop; see its docstring for the algorithm.
"""
import sys

import click

from retina.core import paths
from retina.core.errors import handle_errors
from retina.core.options import (CONTEXT_SETTINGS, crop_size_option, directory_option,
                                 labels_option, no_progress_option, output_folder_option)
from retina.data import conversion, crop, preprocess, preview


@click.command(context_settings=CONTEXT_SETTINGS)
@directory_option('the photographs to convert (.jpeg, .jpg, .png, .tif, .tiff).',
                  default=str(paths.DATA_DIR / 'train'))
@output_folder_option('--convert_directory', 'convert_directory',
                      'the converted images, named like the inputs with the new extension.  '
                      'Images already there are skipped, so an interrupted run resumes.',
                      default=str(paths.DATA_DIR / 'train_medium'))
@click.option('--test', '--preview', 'test', is_flag=True,
              help=f'A preview, not the test set: convert nothing; show up to '
                   f'{preview.PREVIEW_COUNT} level-{preview.PREVIEW_LEVEL} photographs of '
                   '--directory next to their crops (in windows, or as PNGs in --preview_dir when '
                   'there is no display).  (transform.py --test means the test images.)')
@crop_size_option('the pipeline uses 512 for *_medium.', default=512)
@click.option('--extension', default='tiff', show_default=True,
              type=click.Choice(crop.OUTPUT_EXTENSIONS, case_sensitive=False),
              help='Output format: tiff and png are lossless, jpeg is saved at quality 97.')
@click.option('--n_proc', type=click.IntRange(min=1),
              help="Worker processes [default: this machine's CPU count, but no more than one per "
                   f'{conversion.IMAGES_PER_PROCESS} images: a few images convert sooner in one process '
                   'than a pool starts].')
@labels_option('used by --test to pick level-1 images; if it is missing --test uses the first '
               'images.', default=str(paths.LABELS_FILE))
@click.option('--preview_dir', default=str(paths.DATA_DIR / 'convert_preview'), show_default=True,
              type=click.Path(file_okay=False),
              help='Where --test writes {name}_preview.png (photograph with the found box, crop) '
                   'when there is no display.')
@click.option('--enhance', default='none', show_default=True,
              type=click.Choice(preprocess.PREPROCESSING),
              help='Cross-camera preprocessing of the converted images: local_contrast is Ben '
                   "Graham's local-average subtraction (Gaussian of 1/60 of the side) with each "
                   'channel brought to one spread, so raw and already-enhanced photographs from any '
                   'camera get one look; none keeps the colours.  Recorded in the folder '
                   f'({preprocess.RECORD_NAME}): a folder never mixes the two, and later stages '
                   'refuse images prepared unlike the training images.')
@no_progress_option()
@handle_errors(resume_hint='Run the same command again to convert the rest; finished images are kept.')
def main(directory, convert_directory, test, crop_size, extension, n_proc, labels, preview_dir,
         enhance, no_progress):
    """Crop each photograph to the eye, make it square and resize it to crop_size x crop_size.

    Exits with status 1 if any image could not be read (each one is named on
    stderr; the others are still converted).  Warns about images that come out
    blown up (a photo far smaller than crop_size) or black.
    """
    if test:
        _, failed = preview.preview_folder(directory, crop_size, labels, preview_dir)
        if failed:
            click.echo(f'error: {len(failed)} image(s) could not be read (listed above)', err=True)
            sys.exit(1)
        return
    summary = conversion.convert_folder(directory, convert_directory, crop_size, extension.lower(), n_proc,
                                 progress=not no_progress, preprocessing=enhance)
    if len(summary.warnings) > conversion.MAX_WARNINGS_SHOWN:
        click.echo(f'{len(summary.warnings)} warnings in all; the first {conversion.MAX_WARNINGS_SHOWN} '
                   f'are shown above', err=True)
    if summary.failed:
        click.echo(f'error: {len(summary.failed)} of {summary.total} images could not be converted '
                   f'(listed above); replace or remove them and run the command again', err=True)
        sys.exit(1)


if __name__ == '__main__':
    main()
